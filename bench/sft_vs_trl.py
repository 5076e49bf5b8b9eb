"""SFT throughput: our train_sft.py loop against TRL's SFTTrainer, same work, one process.

    python bench/sft_vs_trl.py                        # tiny model, 30 steps, first 5 excluded
    python bench/sft_vs_trl.py --model tiny-small --steps 40 --warmup 5

Measures training tokens per second: prompt + completion tokens that are not padding, image tokens
included, per optimizer step, divided by the step's wall time. Both sides count them the same way,
from the batch that enters the model (ours: prompt attention mask + completion mask, as train_sft.py
logs; TRL: the collated batch's attention mask). Both get: the same model directory and processor,
LoRA r=8 / alpha 16 on model.LORA_TARGET, fp32 on CPU, no gradient checkpointing, batch 8, lr 2e-4
constant, torch AdamW, clip 1.0, seed 0, the same demo SFT records. The first --warmup steps of each
run are excluded. Prints a side-by-side table; the last line is `ratio=<ours / TRL tokens per s>`
(higher is better for us).

Step time. Ours: train_sft.py's own tokens_per_s (its timer spans batch building, forward, backward,
optimizer step). TRL: a TrainerCallback notes the clock at every on_step_end and a step is the
interval between two of them, so TRL's data loading and collation (done by the DataLoader, before
on_step_begin) count in its step as they do in ours.

Threads: one by default (--threads). The tiny model's matrices are too small to gain from a second
thread, and with two, any other process on a 2-core machine makes the OpenMP threads wait on each
other: we measured 3.9 s per step instead of 0.08 s. Both sides always run with the same count.
"""

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOT, load_plain_model, lora_config, median, patched, prepare_demo_data,  # noqa: E402
                    print_table, read_metrics, step_end_callback, trl_sft_dataset)

from pathvlm.tiny import resolve_model_path  # noqa: E402

BATCH_SIZE = 8
LR = 2e-4
LORA_R, LORA_ALPHA = 8, 16


def run_ours(model_dir: str, data: str, steps: int, out_dir: str) -> dict:
    """train_sft.main on our settings; tokens per step counted from what the loop feeds the model."""
    import train_sft

    tokens = []

    def counting(batch_tensors):
        def wrapper(*args, **kwargs):
            prompt, ids, mask = batch_tensors(*args, **kwargs)
            tokens.append(int(prompt["attention_mask"].sum() + mask.sum()))  # what train_sft.py counts
            return prompt, ids, mask
        return wrapper

    with patched(train_sft, "batch_tensors", counting):
        train_sft.main([os.path.join(ROOT, "configs/demo_sft.yaml"), f"model={model_dir}", f"output_dir={out_dir}",
                        f"data={data}", "eval_data=null", "finetune=lora", f"lora_r={LORA_R}",
                        f"lora_alpha={LORA_ALPHA}", "lora_dropout=0.0", f"batch_size={BATCH_SIZE}", "grad_accum=1",
                        f"lr={LR}", "warmup_steps=0", "lr_schedule=constant", "gradient_checkpointing=false",
                        f"max_steps={steps}", "save_every=0", "seed=0", "max_len=2048"])
    rows = read_metrics(out_dir)
    return {"tokens": tokens, "seconds": [n / r["tokens_per_s"] for n, r in zip(tokens, rows)]}


def run_trl(model_dir: str, data: str, steps: int, out_dir: str) -> dict:
    from trl import SFTConfig, SFTTrainer

    model, processor = load_plain_model(model_dir)
    args = SFTConfig(
        output_dir=out_dir, seed=0, max_steps=steps, per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
        bf16=False, fp16=False, gradient_checkpointing=False,  # TRL's defaults are True, True
        max_length=None,  # never truncate (ours drops over-long examples; none are here)
        use_cpu=True, dataloader_num_workers=0, report_to="none", save_strategy="no",
        logging_steps=steps + 1, disable_tqdm=True)
    timer = step_end_callback()
    trainer = SFTTrainer(model=model, args=args, train_dataset=trl_sft_dataset(data), processing_class=processor,
                         peft_config=lora_config(LORA_R, LORA_ALPHA), callbacks=[timer])

    tokens, collate = [], trainer.data_collator

    def counting_collator(examples):  # the train DataLoader is built from trainer.data_collator in train()
        batch = collate(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    # accelerate's DataLoader collates one batch ahead; batch i is still the one step i trains on
    return {"tokens": tokens[:steps], "seconds": timer.step_seconds()}


def summary(run: dict, warmup: int) -> dict:
    tokens, seconds = run["tokens"][warmup:], run["seconds"][warmup:]
    return {"steps": len(seconds), "tokens_per_step": sum(tokens) / len(tokens), "s_per_step": median(seconds),
            "tokens_per_s": median(t / s for t, s in zip(tokens, seconds)),
            "tokens_per_s_total": sum(tokens) / sum(seconds)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | tiny-small")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="first steps of each run left out (>= 2)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for both (see the docstring)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    assert args.warmup >= 2 and args.steps > args.warmup, "need --warmup >= 2 and --steps > --warmup"

    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        data = os.path.join(prepare_demo_data(os.path.join(tmp, "data"), sft_size=64, rl_size=8), "sft.jsonl")
        model_dir = resolve_model_path(args.model)
        ours = summary(run_ours(model_dir, data, args.steps, os.path.join(tmp, "ours")), args.warmup)
        trl = summary(run_trl(model_dir, data, args.steps, os.path.join(tmp, "trl")), args.warmup)

    print(f"\nSFT, model={args.model}, batch {BATCH_SIZE}, LoRA r={LORA_R}, fp32, CPU with "
          f"{torch.get_num_threads()} threads; steps {args.warmup + 1}..{args.steps} measured")
    print_table([("steps measured", ours["steps"], trl["steps"]),
                 ("tokens/step (mean)", ours["tokens_per_step"], trl["tokens_per_step"]),
                 ("s/step (median)", ours["s_per_step"], trl["s_per_step"]),
                 ("tokens/s (median of steps)", ours["tokens_per_s"], trl["tokens_per_s"]),
                 ("tokens/s (all tokens / all time)", ours["tokens_per_s_total"], trl["tokens_per_s_total"])],
                header=("", "ours", "TRL SFTTrainer"))
    print("TRL's completions carry one token more per example (<|im_end|> then '\\n'; ours ends at <|im_end|>).")
    print("ratio = ours tokens/s / TRL tokens/s (medians of steps): higher is better for us")
    print(f"ratio={ours['tokens_per_s'] / trl['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
