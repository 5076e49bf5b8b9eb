"""GRPO step time: our train_grpo.py loop against TRL's GRPOTrainer on identical work, one process.

    python bench/grpo_vs_trl.py                          # tiny model, 15 steps, first 3 excluded
    python bench/grpo_vs_trl.py --model tiny-small
    python bench/grpo_vs_trl.py --runs 3                 # repeat the whole comparison; median ratio

One step, on both sides: 4 demo prompts (one 56-px image each, 4 image tokens) x G=4 completions of
exactly 32 new tokens (EOS cannot be sampled: see common.full_length; temperature 1, the same
special tokens suppressed), format + accuracy rewards (ours, wrapped for TRL), group-normalised
advantages, reference log-probs with the LoRA adapter disabled (β = 0.04), the "grpo" loss (mean
over sequences of per-sequence token means), μ = 1 (no old-policy pass), one micro-batch of 16, one
AdamW step at lr 1e-5. LoRA r=8 / alpha 16 on model.LORA_TARGET, fp32 on CPU, no gradient
checkpointing, seed 0. Ours: train_grpo.main with configs/demo_grpo.yaml and overrides; TRL:
GRPOTrainer(peft_config=...) built by common.make_trl_grpo_trainer.

Measures seconds per optimizer step (median over the steps after --warmup) and a breakdown:
  generate          ours: train_grpo.sample_groups (generate, EOS mask, decode), timed by wrapping it;
                    TRL: GRPOTrainer._generate_single_turn (generate, EOS mask), wrapped likewise.
  rest of the step  everything else: prompts and images, rewards, advantages, reference log-probs,
                    policy forward/backward, optimizer step; for TRL also data loading and its
                    bookkeeping. Of which, ours: loading images and encoding prompts (from
                    metrics.jsonl's gen_tokens_per_s); TRL: the rest of _generate_and_score_completions
                    (chat template and image processing, reference log-probs, rewards, advantages).
Ours: step_s from metrics.jsonl. TRL: a step is the interval between two on_step_end callbacks.
The last line is `ratio=<ours / TRL seconds per step>`: lower is better for us.

Threads: one by default (--threads), for the reason given in bench/sft_vs_trl.py.
"""

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOT, full_length, load_plain_model, make_trl_grpo_trainer, median, patched,  # noqa: E402
                    prepare_demo_data, print_table, read_metrics, timed, train_trl_timed, trl_grpo_dataset)

from pathvlm.tiny import resolve_model_path  # noqa: E402

NUM_PROMPTS, GROUP_SIZE, MAX_NEW_TOKENS = 4, 4, 32
LR, BETA, LOSS_TYPE = 1e-5, 0.04, "grpo"
LORA_R, LORA_ALPHA = 8, 16


def run_ours(model_dir: str, data: str, steps: int, out_dir: str) -> list[dict]:
    import train_grpo

    generate_s = []
    with patched(train_grpo, "sample_groups", lambda fn: timed(fn, generate_s)), \
            full_length():
        train_grpo.main([
            os.path.join(ROOT, "configs/demo_grpo.yaml"), f"model={model_dir}", f"output_dir={out_dir}",
            f"data={data}", "eval_data=null", "init_adapter=null", "reference=base", f"kl_coef={BETA}", f"num_prompts={NUM_PROMPTS}",
            f"group_size={GROUP_SIZE}", f"max_new_tokens={MAX_NEW_TOKENS}", "temperature=1.0", "top_p=1.0",
            f"lr={LR}", "lr_schedule=constant", "warmup_steps=0", "adam_beta2=0.999",  # the demo config: 0.99, 5
            f"lora_r={LORA_R}", f"lora_alpha={LORA_ALPHA}", "lora_dropout=0.0",
            "rewards={format: 1.0, accuracy: 1.0}", "accuracy_requires_format=false", f"loss_type={LOSS_TYPE}",
            "num_iterations=1", "scale_rewards=group", f"micro_batch_size={NUM_PROMPTS * GROUP_SIZE}",
            f"max_steps={steps}", "save_every=0", "sample_every=0", "seed=0", "gradient_checkpointing=false",
            "quantization=none", "resume=none"])
    steps_out = []
    for r, generate in zip(read_metrics(out_dir), generate_s):
        # gen_tokens_per_s spans the step's start to the end of sampling: images, prompts, generate, decode
        sampling = r["completion_len_mean"] * NUM_PROMPTS * GROUP_SIZE / r["gen_tokens_per_s"]
        steps_out.append({"step_s": r["step_s"], "generation_s": generate, "prompt_s": sampling - generate,
                          "rest_s": r["step_s"] - generate, "completion_len": r["completion_len_mean"]})
    return steps_out


def run_trl(model_dir: str, data: str, steps: int, out_dir: str) -> list[dict]:
    model, processor = load_plain_model(model_dir)
    lengths = []
    trainer = make_trl_grpo_trainer(
        model, processor, trl_grpo_dataset(data), out_dir, num_prompts=NUM_PROMPTS, group_size=GROUP_SIZE,
        max_new_tokens=MAX_NEW_TOKENS, max_steps=steps, lr=LR, beta=BETA, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
        loss_type=LOSS_TYPE, seed=0, completion_lengths=lengths)
    return [{**r, "rollout_rest_s": r["rollout_s"] - r["generation_s"], "rest_s": r["step_s"] - r["generation_s"]}
            for r in train_trl_timed(trainer, lengths, NUM_PROMPTS * GROUP_SIZE)]


def compare(model_name: str, steps: int, warmup: int, data: str, tmp: str, trl_first: bool) -> float:
    model_dir = resolve_model_path(model_name)
    runs = {}
    for side in (["trl", "ours"] if trl_first else ["ours", "trl"]):
        out = os.path.join(tmp, side)
        runs[side] = (run_ours if side == "ours" else run_trl)(model_dir, data, steps, out)[warmup:]
    ours, trl = runs["ours"], runs["trl"]

    def med(rows, key):
        return median(r[key] for r in rows)

    print(f"\nGRPO step, model={model_name}: {NUM_PROMPTS} prompts x G={GROUP_SIZE}, {MAX_NEW_TOKENS} new tokens, "
          f"LoRA r={LORA_R}, β={BETA}, loss {LOSS_TYPE}, fp32, CPU with {torch.get_num_threads()} thread(s); "
          f"steps {warmup + 1}..{steps} measured ({'TRL' if trl_first else 'ours'} ran first)")
    print_table([("steps measured", len(ours), len(trl)),
                 ("completion tokens (mean)", med(ours, "completion_len"), med(trl, "completion_len")),
                 ("s/step (median)", med(ours, "step_s"), med(trl, "step_s")),
                 ("  generate", med(ours, "generation_s"), med(trl, "generation_s")),
                 ("  rest of the step", med(ours, "rest_s"), med(trl, "rest_s")),
                 ("    of which: load images, encode prompts", med(ours, "prompt_s"), "-"),
                 ("    of which: rest of TRL's rollout", "-", med(trl, "rollout_rest_s")),
                 ("generated tokens/s (median)",
                  median(r["completion_len"] * NUM_PROMPTS * GROUP_SIZE / r["generation_s"] for r in ours),
                  median(r["completion_len"] * NUM_PROMPTS * GROUP_SIZE / r["generation_s"] for r in trl))],
                header=("", "ours", "TRL GRPOTrainer"))
    return med(ours, "step_s") / med(trl, "step_s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | tiny-small")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3, help="first steps of each run left out (>= 2)")
    p.add_argument("--runs", type=int, default=1, help="repeat the whole comparison; the order alternates")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for both")
    args = p.parse_args(argv)
    assert args.warmup >= 2 and args.steps > args.warmup, "need --warmup >= 2 and --steps > --warmup"
    torch.set_num_threads(args.threads)

    ratios = []
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        data = os.path.join(prepare_demo_data(os.path.join(tmp, "data"), sft_size=8, rl_size=32), "rl.jsonl")
        for run in range(args.runs):
            run_dir = os.path.join(tmp, f"run{run}")
            ratios.append(compare(args.model, args.steps, args.warmup, data, run_dir, trl_first=run % 2 == 1))
            print(f"run {run + 1}: ours/TRL seconds per step = {ratios[-1]:.3f}")
    if args.runs > 1:
        print(f"\nratios of the {args.runs} runs: {', '.join(f'{r:.3f}' for r in ratios)}; median {median(ratios):.3f}")
    print("ratio = ours s/step / TRL s/step: lower is better for us")
    print(f"ratio={median(ratios):.3f}")


if __name__ == "__main__":
    main()
