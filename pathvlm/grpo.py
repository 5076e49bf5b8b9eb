"""The GRPO math: pure tensor functions, no I/O, no model. Each is checked by hand in tests/test_grpo.py.

Shapes: N = B*G completions (B prompts, G samples each, rows i*G ... i*G+G-1 share prompt i),
T = completion tokens.
"""

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
                     counted: torch.Tensor | None = None):
    """A_i = (r_i - mean(r_group)) / (std + eps)                                   rewards: (N,) -> (N,)

    scale: 'group' = the std of the prompt's own group (the GRPO paper; PathVLM-R1),
           'batch' = the std over the whole batch (more stable when a group is nearly uniform),
           'none'  = no division (Dr. GRPO: dividing by a small std over-weights easy prompts).
    We use the unbiased std (ddof=1), as TRL does: rewards [1, 0] -> advantages +-0.707.
    A group whose rewards are all equal gets advantage 0 and so no gradient.
    counted: (N,) bool, whole groups: the rows that are part of the step (dynamic sampling's filler groups
    are not). The others get advantage 0 and take no part in the batch's std."""
    counted = torch.ones_like(rewards, dtype=torch.bool) if counted is None else counted
    grouped = rewards.view(-1, group_size)  # (B, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards[counted].std() + eps)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, got '{scale}'")
    return centered.view(-1) * counted


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (B,) bool: groups whose G rewards are all equal (zero advantage: no learning signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def step_normalisers(loss_type: str, counted: torch.Tensor, loss_mask: torch.Tensor, total=float,
                     world_size: int = 1) -> tuple[float, float, float]:
    """S and K of grpo_loss for a step whose rows are split into micro-batches, and over processes, so that the
    micro-batches' losses add up to the loss of one pass over the whole step, all processes' together.
        S = the step's counted sequences (all processes')
        K = its loss tokens: all processes' (grpo, dapo, dr_grpo), or, for bnpo, this process's tokens times
            the number of processes (each process's token mean, then the mean of those)
    counted: (N,) bool, this process's rows that are part of the step; loss_mask: (N, T).
    total(x): x summed over the processes (training.Processes.sum; float in one process).
    -> (S, K, all_tokens): all_tokens, all processes' loss tokens, weighs each micro-batch's stats."""
    num_sequences, all_tokens = max(total(counted.sum()), 1.0), max(total(loss_mask.sum()), 1.0)
    num_tokens = all_tokens if loss_type != "bnpo" else max(float(loss_mask.sum()), 1.0) * world_size
    return num_sequences, num_tokens, all_tokens


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, clip_eps_high=None, kl_coef=0.04,
              loss_type="grpo", max_completion_len=None, num_sequences=None, num_tokens=None):
    """The clipped GRPO objective with a KL penalty to the reference policy.

        ρ_t  = π_θ(c_t) / π_old(c_t) = exp(logp - old_logp)
        L_t  = -min(ρ_t·A, clip(ρ_t, 1-ε, 1+ε_high)·A) + β·KL_t
        KL_t = exp(ref_logp - logp) - (ref_logp - logp) - 1      (k3 estimator: unbiased, >= 0)

    How the per-token L_t become one number (loss_type), S = num_sequences, K = num_tokens:
        grpo    : Σ_seq (Σ_t m_t·L_t / Σ_t m_t) / S      mean over sequences of their token means
                                                         (the GRPO paper; long answers count less per token)
        bnpo    : Σ m·L / K                              token mean (K: this process's tokens in the step)
        dapo    : Σ m·L / K                              token mean over the step (DAPO; K: all processes')
        dr_grpo : Σ m·L / (S · max_completion_len)       (Dr. GRPO: no length bias)
    S and K count the whole step, so the losses of its micro-batches add up to the loss of one pass
    over all of it, whatever their sizes; left None they count this call's rows and tokens. In one
    process bnpo and dapo are the same number.

    logp, old_logp, ref_logp, mask: (N, T); advantages: (N,). ref_logp may be None when kl_coef = 0.
    Returns (loss, stats) with stats = mean KL and the fraction of tokens whose ratio was clipped."""
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)  # (N, T)
    adv = advantages[:, None]  # (N, 1)
    clipped_ratio = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps_high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)  # (N, T)
    kl = torch.zeros_like(logp)
    if kl_coef != 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1  # (N, T)
        per_token = per_token + kl_coef * kl

    num_sequences = mask.shape[0] if num_sequences is None else num_sequences
    num_tokens = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_sequences
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * mask).sum() / num_tokens
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (num_sequences * (max_completion_len or mask.shape[1]))
    else:
        raise ValueError(f"loss_type must be grpo, bnpo, dapo or dr_grpo, got '{loss_type}'")

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        is_clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps_high) & (adv > 0))
        stats = {"kl": float((kl * mask).sum() / n), "clip_frac": float((is_clipped.to(mask.dtype) * mask).sum() / n)}
    return loss, stats
