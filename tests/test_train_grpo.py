"""The GRPO loop on the tiny model and real demo data: what one step moves, the first step's KL and
ratio, exact resume, non-finite steps, and the process reward through a real local API server."""

import json
import os
import signal

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pathvlm import rollout
import rewards
import train_grpo
import train_sft
from test_rewards import ChatHandler, running_server
from test_sft import signal_after_first_step


def sft_adapter(demo_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft"))
    train_sft.main(["configs/demo_sft.yaml", "model=tiny", f"data={demo_data}/sft.jsonl", "eval_data=null",
                    f"output_dir={out}", "finetune=lora", "max_steps=2", "lr=1e-2", "warmup_steps=0", "batch_size=4"])
    return out


@pytest.fixture(scope="module")
def sft_dir(demo_data, tmp_path_factory):
    return sft_adapter(demo_data, tmp_path_factory)


def grpo_args(demo_data, out, *extra):
    return ["configs/demo_grpo.yaml", "model=tiny", f"data={demo_data}/rl.jsonl", f"output_dir={out}", "num_prompts=2",
            "group_size=4", "max_new_tokens=12", "save_every=2", "sample_every=1", "lr=1e-3", "eval_data=null", *extra]


def grpo(demo_data, out, *extra):
    train_grpo.main(grpo_args(demo_data, out, *extra))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def adapter_weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "adapter_model.safetensors"))


# as source text, so that a training run in another process can register the very same reward
LENGTH_REWARD = "lambda completions, records, **_: [len(c) / 50 for c in completions]"


@pytest.fixture
def length_reward(monkeypatch):
    """An untrained tiny model never earns the format or accuracy reward, so every advantage would be 0;
    a reward on the completion's length varies within each group and gives the step a gradient."""
    monkeypatch.setitem(rewards.REWARDS, "length", eval(LENGTH_REWARD))


def test_step_moves_policy_not_reference(demo_data, sft_dir, tmp_path, length_reward):
    out = str(tmp_path / "g")
    rows = grpo(demo_data, out, f"init_adapter={sft_dir}", "reference=sft", "max_steps=2",
                "rewards={format: 1.0, accuracy: 1.0, length: 1.0}", "temperature=2.0",
                f"eval_data={demo_data}/val.jsonl", "eval_every=2", "eval_items=4")
    # step 1: the policy starts as the SFT adapter, which is also the reference: KL 0 and ratio 1
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7) and rows[0]["clip_frac"] == 0.0
    before, after = adapter_weights(sft_dir), adapter_weights(out)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy moved
    # the reference adapter in the checkpoint is the SFT adapter, untouched
    state = torch.load(os.path.join(out, "checkpoints", "step_0000002", "state.pt"), weights_only=False)
    assert all(".reference." not in name for name in state["model"])  # not trained, not saved as trainable
    for line in open(os.path.join(out, "samples.jsonl")):
        assert {"step", "id", "gold", "reward", "completion"} <= json.loads(line).keys()
    logged = rows[-1]
    for key in ["reward/format", "reward/accuracy", "reward/total", "accuracy", "format_rate", "kl", "clip_frac",
                "completion_len_mean", "completion_len_max", "truncated_frac", "equal_reward_groups",
                "gen_tokens_per_s", "train_tokens_per_s", "peak_mem_gib", "eval_accuracy", "eval_format_rate",
                "sampler/logp_gap_mean", "sampler/ratio_max"]:
        assert key in logged, key


def test_reference_pass_leaves_policy_weights(demo_data, sft_dir):
    from pathvlm.config import GRPOConfig
    from pathvlm.model import load_model

    cfg = GRPOConfig(model="tiny", init_adapter=sft_dir)
    model, _ = load_model(cfg, adapter=sft_dir)
    model.load_adapter(sft_dir, adapter_name="reference", is_trainable=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.default" in n:
                p.add_(0.1)  # make the policy differ from the reference
    policy = {n: p.clone() for n, p in model.named_parameters() if ".default." in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with train_grpo.reference_context(model, "sft"):
        assert model.active_adapter == "reference"
    assert model.active_adapter == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all(torch.equal(policy[n], p) for n, p in model.named_parameters() if n in policy)


def test_exact_resume(demo_data, sft_dir, tmp_path, length_reward):
    common = [f"init_adapter={sft_dir}", "reference=sft", "temperature=2.0", "rewards={length: 1.0}"]
    full = grpo(demo_data, str(tmp_path / "full"), *common, "max_steps=4")
    part = str(tmp_path / "part")
    grpo(demo_data, part, *common, "max_steps=2")
    resumed = grpo(demo_data, part, *common, "max_steps=4")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ["loss", "reward/total", "kl", "completion_len_mean"]:
        assert [r[key] for r in resumed] == [r[key] for r in full], key


def test_ctrl_c_finishes_the_step_then_resumes_exactly(demo_data, sft_dir, tmp_path, length_reward):
    """Ctrl-C lands mid-step; a checkpoint of that moment would count the drawn batch as seen and keep
    the moved RNG, so the resumed run would sample other prompts and completions than the full run."""
    common = [f"init_adapter={sft_dir}", "reference=sft", "temperature=2.0", "rewards={length: 1.0}", "max_steps=10",
              "save_every=0"]
    full_dir, part = str(tmp_path / "full"), str(tmp_path / "part")
    full = grpo(demo_data, full_dir, *common)
    # the same run in its own process (with the same length reward), sent SIGINT once its first step is logged
    script = ("import sys, rewards, train_grpo; "
              f"rewards.REWARDS['length'] = {LENGTH_REWARD}; train_grpo.main(sys.argv[1:])")
    code, err = signal_after_first_step(["-c", script, *grpo_args(demo_data, part, *common)], part, signal.SIGINT)
    assert code == 1 and "stopped by SIGINT after step" in err, err
    saved = os.listdir(os.path.join(part, "checkpoints"))
    assert len(saved) == 1 and 1 <= int(saved[0].removeprefix("step_")) < 10  # stopped early, at a step's end
    resumed = grpo(demo_data, part, *common)
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for key in ["loss", "reward/total", "kl", "completion_len_mean"]:
        assert [r[key] for r in resumed] == [r[key] for r in full], key
    samples = [open(os.path.join(d, "samples.jsonl")).read() for d in (part, full_dir)]
    assert samples[0] == samples[1]  # the same prompts and completions, each step once
    resumed_weights, full_weights = adapter_weights(part), adapter_weights(full_dir)
    assert resumed_weights.keys() == full_weights.keys()
    assert all(torch.equal(resumed_weights[k], full_weights[k]) for k in full_weights)


def test_non_finite_reward_skips_then_stops(demo_data, tmp_path, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "broken", lambda completions, records, **_: [float("nan")] * len(completions))
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit, match="2 non-finite steps in a row"):
        grpo(demo_data, out, "init_adapter=null", "reference=base", "rewards={broken: 1.0}", "max_bad_steps=2", "max_steps=5")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[-1]["skipped_steps"] == 1  # the second bad step stops before it is logged
    assert os.path.isdir(os.path.join(out, "checkpoints", "step_0000002"))


class CyclingHandler(ChatHandler):
    """Answers in turn: well, garbage, an HTML page, cut-off JSON, 7, "80%", nothing, 500, too slow."""
    MODES = ["good", "garbage", "html", "cutoff", "seven", "percent", "empty", "500", "slow", "good"]

    def do_POST(self):
        state = self.server.state
        with state.lock:
            state.mode = self.MODES[len(state.requests) % len(self.MODES)]
        super().do_POST()


@pytest.fixture(scope="module")
def formatted_model(demo_data, tmp_path_factory):
    """The tiny model fully fine-tuned long enough (80 steps, ~10 s) to write <think>...</think><answer>
    completions, so the process reward's judge is really asked."""
    out = str(tmp_path_factory.mktemp("sft_full"))
    train_sft.main(["configs/demo_sft.yaml", "model=tiny", f"data={demo_data}/sft.jsonl", "eval_data=null",
                    f"output_dir={out}", "finetune=full", "max_steps=80", "lr=3e-3", "warmup_steps=0",
                    "batch_size=8", "save_every=0"])
    return out


def test_process_reward_through_local_api_keeps_training(demo_data, formatted_model, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-secret")
    out = str(tmp_path / "proc")
    with running_server(CyclingHandler) as server:
        # init_adapter is a full model (finetune=full): it becomes the base, the policy a new LoRA on it
        rows = grpo(demo_data, out, f"init_adapter={formatted_model}", "reference=sft",
                    "rewards={format: 1.0, accuracy: 1.0, process: 1.0}",
                    "judge=api", f"judge_base_url=http://127.0.0.1:{server.server_address[1]}/v1",
                    "judge_api_key_env=JUDGE_TEST_KEY", "judge_timeout=0.5", "judge_max_retries=1",
                    f"judge_cache_dir={tmp_path}/cache", "max_steps=2", "max_new_tokens=40", "temperature=0.3",
                    # most of this model's answers name an option under another's letter: no committed answer,
                    # so not sent to the judge (rewards.committed); 48 completions a step send enough of them
                    "num_prompts=6", "group_size=8")
    assert len(rows) == 2 and "reward/process" in rows[-1]  # training went on through every failure mode
    last = rows[-1]
    assert last["judge/calls"] >= 10 and last["judge/failures"] >= 1 and last["judge/fallbacks"] >= 3
    # the components of the process reward are logged beside it
    assert any(r["reward/process/fallback"] > 0 for r in rows)
    assert any(r["reward/process/integrity"] is not None for r in rows)  # None in a step where every reply failed
    auth_headers = [r["headers"]["authorization"] for r in server.state.requests]
    assert auth_headers and all(h == "Bearer sk-test-secret" for h in auth_headers)
    assert 0.0 < last["reward/process"] <= 1.0
    assert "sk-test-secret" not in open(os.path.join(out, "config.yaml")).read()


def test_a_dead_judge_stops_grpo_with_a_checkpoint_that_resumes(demo_data, formatted_model, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-secret")
    out = str(tmp_path / "dead")
    with running_server(ChatHandler) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        args = [f"init_adapter={formatted_model}", "reference=sft", "rewards={format: 1.0, accuracy: 1.0, process: 1.0}",
                "judge=api", f"judge_base_url={url}", "judge_api_key_env=JUDGE_TEST_KEY", "judge_max_retries=0",
                f"judge_cache_dir={tmp_path}/cache", "judge_failure_window=8", "max_steps=3", "save_every=0",
                "max_new_tokens=40", "temperature=0.3", "num_prompts=6", "group_size=8"]  # enough committed answers
        server.state.mode = "500"
        with pytest.raises(SystemExit, match=rf"the API judge 'gpt-4o' at {url}: .* failed .*HTTP 500") as stop:
            grpo(demo_data, out, *args)
        assert "sk-test-secret" not in str(stop.value)
        assert "judge: request failed: HTTP 500" in capsys.readouterr().err  # printed at once, not only logged
        [saved] = os.listdir(os.path.join(out, "checkpoints"))  # the step the judge was found down in
        assert saved in ("step_0000001", "step_0000002")
        server.state.mode = "good"
        rows = grpo(demo_data, out, *args)  # the judge answers again: the run goes on from there
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["reward/process/fallback"] == 0
    assert rows[-1]["judge/failures"] >= rows[0]["judge/failures"] > 0  # counters carried over the resume


def tiny_rows(demo_data, model, processor, completions, group_size=2, uneven=False):
    """Rows for len(completions) // group_size demo prompts and the given completion texts.
    uneven: the last prompt gets a longer question and a 4x larger image, so the others are left-padded."""
    from PIL import Image

    from pathvlm.records import image_path, load_split, prompt_messages
    from pathvlm.generation import encode_completions, encode_prompts, image_features

    path = f"{demo_data}/rl.jsonl"
    records = load_split(path)[:len(completions) // group_size]
    images = [Image.open(image_path(path, r)) for r in records]
    if uneven:
        records[-1].question += " Look at the whole patch, the nuclei and the stroma, before answering."
        images[-1] = images[-1].resize((112, 112))
    prompt = encode_prompts(processor, [prompt_messages(r) for r in records], images, "cpu")
    ids, mask = encode_completions(processor.tokenizer, completions, "cpu")
    return rollout.Rows(model, prompt, image_features(model, prompt), ids, mask, group_size=group_size)


def test_rows_positions_equal_transformers_own(demo_data):
    """Rows builds M-RoPE positions from the prompts alone; they must equal what transformers
    computes for the whole prompt + completion sequences."""
    from pathvlm.config import GRPOConfig
    from pathvlm.model import load_model, unwrap

    model, processor = load_model(GRPOConfig(model="tiny", reference="base"))
    rows = tiny_rows(demo_data, model, processor, ["<think>a</think>", "b", "<answer>A</answer>", "c c c"])
    ids, mask = rows.ids, rows.mask
    full_mask = torch.cat([rows.prompt["attention_mask"], mask], 1)
    expected, _ = unwrap(model).model.get_rope_index(
        torch.cat([rows.prompt["input_ids"], ids], 1), torch.cat([rows.prompt["mm_token_type_ids"], torch.zeros_like(ids)], 1),
        rows.prompt["image_grid_thw"], attention_mask=full_mask)
    on = full_mask.bool()[None].expand(3, -1, -1)
    assert torch.equal(rows.position_ids[on], expected[on])  # padding positions are never attended


def test_shared_prompt_logprobs_equal_full_pass(demo_data):
    from pathvlm.config import GRPOConfig
    from pathvlm.model import load_model

    cfg = GRPOConfig(model="tiny", reference="base", micro_batch_size=4, group_size=2, gradient_checkpointing=True)
    model, processor = load_model(cfg)
    model.train()  # as in the loop: with checkpointing, transformers drops the KV cache in training mode
    rows = tiny_rows(demo_data, model, processor, ["<think>a</think>", "b", "<answer>A</answer>", "c c c", "dd",
                                                   "<think>The patch is mostly brown.</think>"])
    mask = rows.mask
    with torch.no_grad():
        full = torch.cat([rollout.completion_logprobs(model, **rows.part(i, 2)) for i in range(0, 6, 2)])
    shared = train_grpo.logprobs_no_grad(model, rows, cfg)  # micro_batch_size 4: 2 groups, then 1
    assert torch.allclose(full * mask, shared * mask, atol=1e-5)


def test_logprobs_leave_out_the_padding_columns(demo_data):
    """Prompts of different lengths (a larger image, a longer question) and completions of different
    lengths: each micro-batch leaves out the columns that are padding in all its rows, and its
    log-probs equal the full, padded pass, with and without prompt sharing."""
    from pathvlm.config import GRPOConfig
    from pathvlm.model import load_model

    model, processor = load_model(GRPOConfig(model="tiny", reference="base"))
    model.eval()
    completions = ["a", "<think>b b b</think>", "c", "<think>The patch is brown.</think>"]
    rows = tiny_rows(demo_data, model, processor, completions, uneven=True)
    first, width = rows.columns(0, 2)  # the short prompt's group
    assert first > 0 and width < rows.ids.shape[1]  # both kinds of padding are there to leave out
    assert rows.columns(2, 2) == (0, rows.ids.shape[1])  # the long prompt and the longest completion
    with torch.no_grad():
        full = torch.cat([rollout.completion_logprobs(model, **rows.part(i, 2)) for i in (0, 2)]) * rows.mask
        for share in (False, True):
            cut = torch.cat([rows.logprobs(model, i, 2, chunk_size=5, share_prompt=share) for i in (0, 2)])
            assert torch.allclose(full, cut, atol=1e-5), share
            assert torch.equal(cut[rows.mask == 0], torch.zeros(int((rows.mask == 0).sum())))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_policy_pass_has_the_full_pass_gradients(demo_data, checkpointing):
    """The policy pass runs each prompt once for its group, under gradient checkpointing too (the
    layers replay in backward): the gradients equal those of the full pass over every row."""
    from pathvlm.config import GRPOConfig
    from pathvlm.model import load_model, unwrap

    model, processor = load_model(GRPOConfig(model="tiny", reference="base", gradient_checkpointing=checkpointing))
    model.train()
    assert unwrap(model).model.language_model.layers[0].gradient_checkpointing == checkpointing
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B = 0 at init would hide errors in the adapter's gradient path
    rows = tiny_rows(demo_data, model, processor, ["<think>a</think>", "b b", "<answer>A</answer>", "c"])
    mask = rows.mask
    weights = torch.tensor([[0.5], [-1.0], [2.0], [0.3]])
    grads = []
    for share in (False, True):
        model.zero_grad()
        logp = rows.logprobs(model, 0, 4, chunk_size=3, share_prompt=share)
        (logp * mask * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-5) for n in grads[0])
    assert any(g.abs().sum() > 0 for g in grads[1].values())


def test_lora_merged_sampling_restores_weights_exactly(sft_dir):
    from pathvlm.config import GRPOConfig
    from pathvlm.model import load_model

    model, _ = load_model(GRPOConfig(model="tiny", reference="base"), adapter=sft_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with rollout.lora_merged(model, True):
        merged = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    assert any(not torch.equal(merged[n], before[n]) for n in merged)  # the update was folded in
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # and taken out, bit for bit


# ----------------------------------------------------------------------------------------------
# The real path's loop bugs (issue 12): each test fails on the loop as it was before

def with_step_gradients(fn, *args):
    """fn(*args), and the gradient each optimizer step was handed (every micro-batch's backward, summed and
    clipped), one tensor per trainable parameter in the optimizer's order."""
    steps = []

    def record(optimizer, _args, _kwargs):
        steps.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                      for group in optimizer.param_groups for p in group["params"]])

    handle = register_optimizer_step_pre_hook(record)  # every optimizer's, for the length of the call
    try:
        return fn(*args), steps
    finally:
        handle.remove()


def assert_same_gradient(a: list[torch.Tensor], b: list[torch.Tensor]):
    """Equal up to the order of float32 sums: rtol per entry, atol scaled to the largest entry. Summed in
    another order (micro-batches, processes), entries differ by at most ~6e-7 of the largest (measured with
    ATen's avx512, avx2 and default kernels); the bugs looked for change a row's or a process's weight by
    tens of percent (1/8 for 1/12, a normaliser counted per process, gradients left unsummed)."""
    scale = max(float(g.abs().max()) for g in a)
    assert scale > 0 and len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo", "dapo"])
def test_unequal_micro_batches_give_the_one_pass_step(demo_data, sft_dir, tmp_path, length_reward, loss_type):
    """12 completions as micro-batches of 8 + 4 or as one pass of 12: the same samples (the sampler does
    not see micro_batch_size), so the same loss and the same gradient handed to the optimizer. Averaging
    the two micro-batches' losses instead would weigh a row of the small one 1/8, not 1/12. (The policy
    starts as the SFT adapter and the reference is the base, so the KL term makes the step-1 loss non-zero.)
    The updated adapters are not compared: 8 + 4 and 12 rows sum in another order, and Adam's first step,
    lr·g/(|g| + eps), turns the rounding of a gradient entry near 0 into a step anywhere in ±lr, on
    entries that depend on the CPU's kernels (issue 21)."""
    common = [f"init_adapter={sft_dir}", "reference=base", "kl_coef=0.5", "num_prompts=3", "group_size=4",
              "temperature=2.0", "rewards={length: 1.0}", "max_steps=1", f"loss_type={loss_type}",
              "lr_schedule=constant"]
    split, whole = str(tmp_path / "split"), str(tmp_path / "whole")
    rows_split, grads_split = with_step_gradients(grpo, demo_data, split, *common, "micro_batch_size=8")
    rows_whole, grads_whole = with_step_gradients(grpo, demo_data, whole, *common, "micro_batch_size=12")
    assert len(grads_split) == len(grads_whole) == 1
    assert_same_gradient(grads_split[0], grads_whole[0])
    # metrics.jsonl keeps 6 decimals: equal values may round 1e-6 apart
    assert rows_split[0]["loss"] == pytest.approx(rows_whole[0]["loss"], rel=1e-5, abs=2e-6)
    assert rows_split[0]["kl"] == pytest.approx(rows_whole[0]["kl"], rel=1e-5, abs=2e-6)
    assert rows_whole[0]["loss"] != 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_group_of_eos_only_completions_is_scored(demo_data, checkpointing):
    """Every completion of a micro-batch is EOS alone (width 1): the shared-prompt pass equals the full
    pass, without and with gradients."""
    from pathvlm.config import GRPOConfig
    from pathvlm.model import load_model

    model, processor = load_model(GRPOConfig(model="tiny", reference="base", gradient_checkpointing=checkpointing))
    model.train()
    rows = tiny_rows(demo_data, model, processor, ["", ""])  # encode_completions appends EOS: [EOS], [EOS]
    assert rows.ids.shape[1] == 1
    with torch.no_grad():
        full = rollout.completion_logprobs(model, **rows.part(0, 2))
        assert torch.allclose(rows.logprobs(model, 0, 2, 1024, share_prompt=True), full, atol=1e-5)
    logp = rows.logprobs(model, 0, 2, 1024, share_prompt=True)
    logp.sum().backward()
    assert torch.allclose(logp.detach(), full, atol=1e-5)


def test_a_non_finite_micro_batch_leaves_no_gradient_behind(demo_data, tmp_path, length_reward, monkeypatch):
    """The second of two micro-batches turns NaN after the first has run backward(): the step is
    skipped, and its first half's gradient must not wait in .grad to be added to the next update."""
    from pathvlm.model import unwrap

    seen = {}

    def nan_on_second_policy_pass(module, args, output):
        if torch.is_grad_enabled():  # the policy pass (sampling and reference run without grad)
            seen["calls"] = seen.get("calls", 0) + 1
            if seen["calls"] == 2:
                output.last_hidden_state = output.last_hidden_state * float("nan")
        return output

    def load_with_fault(*args, **kwargs):
        model, processor = train_grpo_load(*args, **kwargs)
        seen["model"] = model
        unwrap(model).model.register_forward_hook(nan_on_second_policy_pass)
        return model, processor

    train_grpo_load = train_grpo.load_model
    monkeypatch.setattr(train_grpo, "load_model", load_with_fault)
    rows = grpo(demo_data, str(tmp_path / "g"), "init_adapter=null", "reference=base", "rewards={length: 1.0}",
                "temperature=2.0", "micro_batch_size=4", "max_steps=1")  # 2 prompts x G=4: two micro-batches
    assert seen["calls"] == 2 and rows[0]["skipped_steps"] == 1
    assert all(p.grad is None for p in seen["model"].parameters() if p.requires_grad)


def test_kl_is_zero_at_the_first_step_after_sft_with_dropout(demo_data, tmp_path, length_reward):
    """An SFT adapter trained with lora_dropout 0.5 is both the policy's start and the reference: GRPO
    runs it without dropout in every pass, so at step 1 the KL is 0 (dropout noise alone made it > 0)."""
    sft = str(tmp_path / "sft")
    train_sft.main(["configs/demo_sft.yaml", "model=tiny", f"data={demo_data}/sft.jsonl", "eval_data=null",
                    f"output_dir={sft}", "finetune=lora", "lora_dropout=0.5", "max_steps=2", "lr=1e-2",
                    "warmup_steps=0", "batch_size=4"])
    with open(os.path.join(sft, "adapter_config.json")) as f:
        assert json.load(f)["lora_dropout"] == 0.5
    rows = grpo(demo_data, str(tmp_path / "g"), f"init_adapter={sft}", "reference=sft", "rewards={length: 1.0}",
                "temperature=2.0", "max_steps=1", "kl_coef=0.04")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)


def test_grpo_refuses_what_would_make_its_numbers_meaningless():
    from pathvlm.config import ConfigError, GRPOConfig, load_config

    with pytest.raises(ConfigError, match="group_size' must be at least 2"):
        load_config(GRPOConfig, None, ["group_size=1", "reference=base"])
    with pytest.raises(ConfigError, match="lora_dropout must be 0"):
        load_config(GRPOConfig, None, ["lora_dropout=0.05", "reference=base"])


def test_16_bit_models_run_their_lora_layers_under_autocast(demo_data, tmp_path, length_reward, monkeypatch):
    """A bf16 base (as on a GPU) with fp32 LoRA weights: the adapters' matmuls must run in bf16, not
    on fp32 copies of their inputs. Checked on the CPU's bf16 autocast through one real GRPO step."""
    from pathvlm.model import unwrap

    dtypes = set()

    def load_and_watch(*args, **kwargs):
        model, processor = train_grpo_load(*args, **kwargs)
        lora_a = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_A.default"))
        assert lora_a.weight.dtype == torch.float32 and unwrap(model).dtype == torch.bfloat16
        lora_a.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
        return model, processor

    train_grpo_load = train_grpo.load_model
    monkeypatch.setattr(train_grpo, "load_model", load_and_watch)
    rows = grpo(demo_data, str(tmp_path / "g"), "init_adapter=null", "reference=base", "rewards={length: 1.0}",
                "dtype=bf16", "max_steps=1", "merge_for_sampling=false")
    assert dtypes == {torch.bfloat16} and rows[0]["skipped_steps"] == 0


def test_the_sampler_trainer_gap_is_logged(demo_data, tmp_path, length_reward):
    """fp32, LoRA not merged, temperature 0.7: the static sampler's log-probs are the trainer's own, so
    the gap is float noise; sampler=hf returns no log-probs and logs no gap."""
    common = ["init_adapter=null", "reference=base", "rewards={length: 1.0}", "max_steps=1", "merge_for_sampling=false",
              "temperature=0.7"]
    static = grpo(demo_data, str(tmp_path / "static"), *common)
    assert static[0]["sampler/logp_gap_mean"] < 1e-5 and 1 <= static[0]["sampler/ratio_max"] < 1 + 1e-4
    hf = grpo(demo_data, str(tmp_path / "hf"), *common, "sampler=hf")
    assert "sampler/logp_gap_mean" not in hf[0] and hf[0]["skipped_steps"] == 0


# ----------------------------------------------------------------------------------------------
# The objective's switches, through the real loop: each test fails if its switch is ignored

def test_num_iterations_2_updates_against_the_frozen_old_policy(demo_data, tmp_path, length_reward):
    """μ = 1: ratio 1, so without a KL term the surrogate sums to 0 over each group. μ = 2: the second
    update sees π_θ moved away from π_old (ratio != 1), and its loss no longer does."""
    common = ["init_adapter=null", "reference=none", "kl_coef=0", "rewards={length: 1.0}", "temperature=2.0",
              "max_steps=1", "lr=1e-2", "lr_schedule=constant"]
    one = grpo(demo_data, str(tmp_path / "mu1"), *common, "num_iterations=1")
    two = grpo(demo_data, str(tmp_path / "mu2"), *common, "num_iterations=2")
    assert abs(one[0]["loss"]) < 1e-6 and abs(two[0]["loss"]) > 1e-4


def test_loss_types_give_different_losses_on_the_same_samples(demo_data, sft_dir, tmp_path, length_reward):
    """The same samples (same seed), a KL term that is not 0 (SFT policy, base reference): grpo, bnpo,
    dr_grpo divide it differently, so each gives its own loss."""
    rows = {kind: grpo(demo_data, str(tmp_path / kind), f"init_adapter={sft_dir}", "reference=base", "kl_coef=0.5",
                       "rewards={length: 1.0}", "max_steps=1", f"loss_type={kind}", "max_new_tokens=96")[0]
            for kind in ("grpo", "bnpo", "dr_grpo")}
    # the three differ only where completion lengths do: some must stop before max_new_tokens
    assert all(r["completion_len_mean"] < r["completion_len_max"] for r in rows.values())
    losses = {kind: r["loss"] for kind, r in rows.items()}
    assert len({round(v, 6) for v in losses.values()}) == 3, losses


def test_mask_truncated_and_skip_equal_groups_take_rows_out_of_the_loss(demo_data, sft_dir, tmp_path):
    """Format + accuracy on an untrained policy: every reward 0, every group equal. 4 new tokens: most
    completions truncated. Only the KL term is left (SFT policy, base reference). skip_equal_groups
    removes every row from the loss (the adapter does not move); mask_truncated the truncated ones."""
    common = [f"init_adapter={sft_dir}", "reference=base", "kl_coef=0.5", "rewards={format: 1.0, accuracy: 1.0}",
              "max_steps=1", "max_new_tokens=4", "lr=1e-2"]
    plain = grpo(demo_data, str(tmp_path / "plain"), *common)[0]
    assert plain["truncated_frac"] > 0.5 and plain["equal_reward_groups"] == 2 and plain["loss"] > 0
    skipped = str(tmp_path / "skip")
    assert grpo(demo_data, skipped, *common, "skip_equal_groups=true")[0]["loss"] == 0.0
    before, after = adapter_weights(sft_dir), adapter_weights(skipped)
    assert all(torch.equal(before[k], after[k]) for k in before)
    masked = grpo(demo_data, str(tmp_path / "mask"), *common, "mask_truncated=true")[0]
    assert masked["truncated_frac"] == plain["truncated_frac"]  # the same samples
    assert masked["loss"] != plain["loss"] and (masked["loss"] == 0.0) == (plain["truncated_frac"] == 1.0)


def test_dynamic_sampling_draws_until_groups_differ_and_resumes_exactly(demo_data, tmp_path, length_reward):
    """All-equal rewards (format + accuracy on an untrained policy): every group is dropped, each step
    draws max_sampling_rounds rounds, goes on with filler groups, and says so. A length reward: no group
    is dropped. The data order moves by the rounds drawn, and resume is exact."""
    from pathvlm.training import DataOrder

    common = ["init_adapter=null", "reference=base", "dynamic_sampling=true", "max_sampling_rounds=3",
              "num_prompts=2", "max_steps=2", "sample_every=1"]
    out = str(tmp_path / "equal")
    rows = grpo(demo_data, out, *common, "rewards={format: 1.0, accuracy: 1.0}")
    assert [(r["groups_drawn"], r["groups_dropped"], r["groups_short"]) for r in rows] == [(6, 6, 2)] * 2
    assert rows[0]["loss"] == 0.0  # filler groups carry no loss
    order = DataOrder(24, 0)
    first_rounds, second_step = order.next(6), order.next(2)  # step 1 drew 3 rounds of 2
    from pathvlm.records import load_split
    ids = [r.id for r in load_split(f"{demo_data}/rl.jsonl")]
    step2 = [json.loads(line)["id"] for line in open(os.path.join(out, "samples.jsonl")) if '"step": 2' in line]
    assert set(step2) <= {ids[i] for i in first_rounds + second_step} and set(step2) & {ids[i] for i in second_step}
    varied = grpo(demo_data, str(tmp_path / "varied"), *common, "rewards={length: 1.0}", "temperature=2.0")
    assert [(r["groups_drawn"], r["groups_dropped"], r["groups_short"]) for r in varied] == [(2, 0, 0)] * 2
    full = grpo(demo_data, str(tmp_path / "full"), *common, "rewards={format: 1.0, length: 1.0}", "max_steps=4",
                "save_every=2")
    part = str(tmp_path / "part")
    grpo(demo_data, part, *common, "rewards={format: 1.0, length: 1.0}", "max_steps=2", "save_every=2")
    resumed = grpo(demo_data, part, *common, "rewards={format: 1.0, length: 1.0}", "max_steps=4", "save_every=2")
    for key in ["loss", "reward/total", "groups_drawn", "completion_len_mean"]:
        assert [r[key] for r in resumed] == [r[key] for r in full], key


def test_merge_for_sampling_auto_is_on_for_cpu_only():
    """auto: a GPU run keeps its memory (the exact restore copies every adapted layer); a 4-bit base never merges."""
    from pathvlm.config import GRPOConfig

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert rollout.merge_while_sampling(GRPOConfig(reference="base"), cpu)
    assert not rollout.merge_while_sampling(GRPOConfig(reference="base"), gpu)
    assert rollout.merge_while_sampling(GRPOConfig(reference="base", merge_for_sampling=True), gpu)
    assert not rollout.merge_while_sampling(GRPOConfig(reference="base", quantization="4bit"), cpu)


def test_log_groups_writes_that_many_groups_or_all(demo_data, tmp_path):
    """samples.jsonl holds log_groups groups of G completions per logged step; 0 writes every group."""
    for log_groups, expected in [(1, 4), (0, 12)]:
        out = str(tmp_path / f"log{log_groups}")
        grpo(demo_data, out, "init_adapter=null", "reference=base", "num_prompts=3", "max_steps=1",
             f"log_groups={log_groups}")
        lines = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
        assert len(lines) == expected and {r["step"] for r in lines} == {1}
