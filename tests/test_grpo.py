"""The GRPO math against numbers worked by hand, and its gradients against finite differences."""

import math

import pytest
import torch

from pathvlm.grpo import equal_reward_groups, group_advantages, grpo_loss, step_normalisers


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0])  # two groups of G=2
    adv = group_advantages(rewards, 2, "group")
    # group 1: mean 0.5, unbiased std sqrt(0.5) = 0.7071 -> +-0.5/0.7071 = +-0.7071; group 2: all equal -> 0
    assert torch.allclose(adv, torch.tensor([0.7070, -0.7070, 0.0, 0.0]), atol=1e-3)
    # batch std: std([1, 0, 2, 2]) = 0.9574 -> (1-0.5)/0.9575 = 0.5222
    assert torch.allclose(group_advantages(rewards, 2, "batch"), torch.tensor([0.5222, -0.5222, 0, 0]), atol=1e-3)
    assert torch.equal(group_advantages(rewards, 2, "none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    assert equal_reward_groups(rewards, 2).tolist() == [False, True]
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 2, "groups")


def one_token(logp, old=0.0, ref=None, adv=1.0, **kw):
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    return grpo_loss(t(logp), t(old), None if ref is None else t(ref), torch.tensor([adv], dtype=torch.float64),
                     torch.ones(1, 1), **kw)


def test_clipped_surrogate_by_hand():
    # A=1, ratio 1.5, eps 0.2 -> -min(1.5, 1.2) = -1.2
    assert one_token(math.log(1.5), kl_coef=0)[0].item() == pytest.approx(-1.2)
    # A=-1, ratio 0.5 -> -min(-0.5, 0.8*-1) = 0.8
    assert one_token(math.log(0.5), adv=-1.0, kl_coef=0)[0].item() == pytest.approx(0.8)
    # clip-higher: eps_high 0.28 -> -1.28
    assert one_token(math.log(1.5), kl_coef=0, clip_eps_high=0.28)[0].item() == pytest.approx(-1.28)
    # inside the clip range the ratio is used as is
    assert one_token(math.log(1.1), kl_coef=0)[0].item() == pytest.approx(-1.1)
    assert one_token(math.log(1.5), kl_coef=0)[1]["clip_frac"] == 1.0


def test_kl_k3_by_hand():
    # ref_logp - logp = ln 2 -> 2 - ln 2 - 1 = 0.3069
    loss, stats = one_token(0.0, old=0.0, ref=math.log(2), adv=0.0, kl_coef=1.0)
    assert stats["kl"] == pytest.approx(0.30685, abs=1e-5) and loss.item() == pytest.approx(0.30685, abs=1e-5)
    assert one_token(0.0, ref=math.log(2), adv=0.0, kl_coef=0.04)[0].item() == pytest.approx(0.04 * 0.30685, abs=1e-6)


def test_loss_types_aggregate_as_documented():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, 2.0])
    # ratio 1 everywhere -> per-token loss = -A: row 1 [-1,-1,-1], row 2 [-2]
    run = lambda kind, **kw: grpo_loss(logp, logp, None, adv, mask, kl_coef=0, loss_type=kind, **kw)[0].item()  # noqa
    assert run("grpo") == pytest.approx((-1 + -2) / 2)  # mean of per-sequence means
    assert run("bnpo") == pytest.approx(-5 / 4)  # token mean
    assert run("dapo", num_tokens=10) == pytest.approx(-5 / 10)  # tokens of the whole step
    assert run("dr_grpo", max_completion_len=5) == pytest.approx(-5 / (2 * 5))
    with pytest.raises(ValueError, match="loss_type"):
        run("ppo")


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    logp = (torch.randn(3, 4, dtype=torch.float64) * 0.3 - 1).requires_grad_()
    old = (logp.detach() + torch.randn(3, 4, dtype=torch.float64) * 0.3)  # ratios on both sides of the clip
    ref = logp.detach() + torch.randn(3, 4, dtype=torch.float64) * 0.5
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float64)
    f = lambda x: grpo_loss(x, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.1)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (logp,), eps=1e-6, atol=1e-5)
    f(logp).backward()
    assert torch.all(logp.grad[mask == 0] == 0)  # masked tokens get no gradient


def test_first_step_ratio_one_kl_zero():
    logp = torch.randn(4, 5)
    loss, stats = grpo_loss(logp, logp, logp, torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.ones(4, 5))
    assert stats["kl"] == 0.0 and stats["clip_frac"] == 0.0
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # ratio 1, advantages sum to 0 per equal-length rows


def test_groups_not_counted_take_no_part_in_the_batch_std():
    """Dynamic sampling's filler groups: 2 informative groups beside 6 equal-reward fillers must get the
    advantages they would get alone; before, the fillers' zeros entered the batch std (1.59x larger here)."""
    informative = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])  # 2 groups of G=4
    filler = torch.zeros(6 * 4)
    rewards = torch.cat([informative, filler])
    counted = torch.cat([torch.ones(8, dtype=torch.bool), torch.zeros(24, dtype=torch.bool)])
    alone = group_advantages(informative, 4, "batch")
    together = group_advantages(rewards, 4, "batch", counted=counted)
    assert torch.allclose(together[:8], alone) and torch.equal(together[8:], torch.zeros(24))
    uncorrected = group_advantages(rewards, 4, "batch")[:8]
    assert uncorrected.abs().max() / alone.abs().max() == pytest.approx(0.5345 / 0.3360, rel=1e-3)  # std 8 vs 32 rows


def test_step_normalisers_by_hand():
    counted = torch.tensor([True, True, False, False])  # the last group is dynamic sampling's filler
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])  # 3 counted-or-not tokens + 3 + 0
    assert step_normalisers("grpo", counted, mask) == (2.0, 6.0, 6.0)
    # a second process with 3 counted rows and 4 tokens: S and K count both; bnpo keeps this process's
    # 6 tokens, times 2 processes (the mean over processes of each one's token mean)
    other = {2.0: 3.0, 6.0: 4.0}
    total = lambda x: float(x) + other[float(x)]  # noqa: E731  (what Processes.sum does with two)
    assert step_normalisers("dapo", counted, mask, total, 2) == (5.0, 10.0, 10.0)
    assert step_normalisers("bnpo", counted, mask, total, 2) == (5.0, 12.0, 10.0)
    # nothing to count: 1, never a division by zero
    assert step_normalisers("grpo", torch.zeros(2, dtype=torch.bool), torch.zeros(2, 3)) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_micro_batches_and_processes_add_up_to_one_pass(loss_type):
    """What train_grpo.update_policy relies on: with step_normalisers' S and K, the losses of any split of
    the step into micro-batches, on any number of processes, add up to the loss of one pass over it (bnpo:
    to the mean over processes of each process's one-pass loss)."""
    torch.manual_seed(0)
    n, t = 8, 5
    logp = -torch.rand(n, t)
    old_logp, ref_logp = logp + 0.1 * torch.randn(n, t), logp + 0.1 * torch.randn(n, t)
    advantages, mask = torch.randn(n), (torch.rand(n, t) > 0.3).long()
    kw = dict(kl_coef=0.1, loss_type=loss_type, max_completion_len=t)

    def loss(rows, **normalisers):
        return grpo_loss(logp[rows], old_logp[rows], ref_logp[rows], advantages[rows], mask[rows], **kw,
                         **normalisers)[0]

    whole = loss(slice(0, n))
    counted = torch.ones(n, dtype=torch.bool)
    s, k, _ = step_normalisers(loss_type, counted, mask)
    assert torch.allclose(loss(slice(0, 3), num_sequences=s, num_tokens=k)
                          + loss(slice(3, n), num_sequences=s, num_tokens=k), whole, atol=1e-6)
    halves = [slice(0, 4), slice(4, n)]  # two processes, each with its half of the rows
    parts = []
    for mine, theirs in (halves, halves[::-1]):
        seen = {float(counted[mine].sum()): float(counted[theirs].sum()),  # this process's count -> the other's
                float(mask[mine].sum()): float(mask[theirs].sum())}
        total = lambda x: float(x) + seen[float(x)]  # noqa: E731
        s, k, _ = step_normalisers(loss_type, counted[mine], mask[mine], total, 2)
        parts.append(loss(mine, num_sequences=s, num_tokens=k))
    expected = (loss(halves[0]) + loss(halves[1])) / 2 if loss_type == "bnpo" else whole
    assert torch.allclose(parts[0] + parts[1], expected, atol=1e-6)
