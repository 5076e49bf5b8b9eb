"""Decode speed of the two samplers side by side: ms per generated token position, static against hf.

    python bench/sampler_speed.py                   # tiny model, batch 1, 8 and 32, 64 new tokens
    python bench/sampler_speed.py --model tiny-small --threads 2

The work: the demo's first RL prompts (one 56-px image each), G completions each of exactly --new-tokens
tokens (no stop token can be sampled: common.full_length), temperature 1, LoRA merged as the GRPO loop
does on a CPU. Batch = prompts x G rows. ms/token = the sample call's seconds / new tokens, the median of
--repeats calls after one warm-up: the time one more token position costs the whole batch, which on a
GPU is the launch-bound part of a GRPO step. Both samplers run in the same process, alternating.

Then, greedy decoding on the random (untrained) model, static against hf: how many rows differ, and the
logit margin between the two best tokens where they first do. Random weights give nearly tied logits,
where summing in another order (one fixed-shape step over the whole cache against generate's growing
one) flips the arg-max; a trained model's peaked logits do not (tests/test_sampler.py).
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import full_length, median, prepare_demo_data, print_table  # noqa: E402

from pathvlm.config import ModelConfig  # noqa: E402
from pathvlm.generation import encode_prompts, image_features, special_token_ids  # noqa: E402
from pathvlm.images import open_image  # noqa: E402
from pathvlm.model import load_model  # noqa: E402
from pathvlm.records import image_path, load_split, prompt_messages  # noqa: E402
from pathvlm.rollout import lora_merged  # noqa: E402
from pathvlm.sampler import greedy, sample  # noqa: E402


def prompts(processor, split: str, n: int) -> dict:
    records = load_split(split)[:n]
    images = [open_image(image_path(split, r)) for r in records]
    return encode_prompts(processor, [prompt_messages(r) for r in records], images, "cpu")


def ms_per_token(model, processor, prompt, group: int, new_tokens: int, sampler: str, repeats: int) -> float:
    features = image_features(model, prompt)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        out = sample(model, processor.tokenizer, prompt, features, max_new_tokens=new_tokens, group_size=group,
                     temperature=1.0, sampler=sampler)
        assert out.ids.shape[1] == new_tokens
        if i:  # the first call warms up
            times.append(1000 * (time.perf_counter() - start) / new_tokens)
    return median(times)


def greedy_flips(model, processor, split: str, n: int, new_tokens: int) -> tuple[int, int, list[float]]:
    """-> (rows whose static and hf greedy answers differ, rows, the top-2 logit margin where each first differs)."""
    prompt = prompts(processor, split, n)
    static, _ = greedy(model, processor, prompt, new_tokens, sampler="static")
    hf, _ = greedy(model, processor, prompt, new_tokens, sampler="hf")
    width = min(static.ids.shape[1], hf.ids.shape[1])
    differ = (static.ids[:, :width] != hf.ids[:, :width]).any(1)
    margins = []
    for row in differ.nonzero().flatten().tolist():
        t = int((static.ids[row, :width] != hf.ids[row, :width]).int().argmax())
        ids = torch.cat([prompt["input_ids"][row:row + 1], static.ids[row:row + 1, :t]], 1)
        mask = torch.cat([prompt["attention_mask"][row:row + 1], torch.ones(1, t, dtype=torch.long)], 1)
        types = torch.cat([prompt["mm_token_type_ids"][row:row + 1], torch.zeros(1, t, dtype=torch.long)], 1)
        one = {k: v for k, v in prompt.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        pixels = slice(int(prompt["image_grid_thw"][:row].prod(1).sum()),
                       int(prompt["image_grid_thw"][:row + 1].prod(1).sum()))
        one.update(input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
                   pixel_values=prompt["pixel_values"][pixels], image_grid_thw=prompt["image_grid_thw"][row:row + 1])
        with torch.no_grad():
            logits = model(**one).logits[0, -1].float()
        logits[special_token_ids(processor.tokenizer)] = float("-inf")
        top = logits.topk(2).values
        margins.append(float(top[0] - top[1]))
    return int(differ.sum()), len(differ), margins


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="rows per call (prompts x G)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--flip-prompts", type=int, default=64, help="prompts for the greedy comparison (0: skip it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, processor = load_model(ModelConfig(model=args.model))
    model.eval()
    with tempfile.TemporaryDirectory(prefix="bench_sampler_") as tmp:
        split = os.path.join(prepare_demo_data(os.path.join(tmp, "data"), sft_size=8, rl_size=64), "rl.jsonl")
        rows = []
        with lora_merged(model, True), full_length():
            for batch in args.batches:
                n_prompts, group = (1, batch) if batch < 4 else (4, batch // 4)
                prompt = prompts(processor, split, n_prompts)
                hf = ms_per_token(model, processor, prompt, group, args.new_tokens, "hf", args.repeats)
                static = ms_per_token(model, processor, prompt, group, args.new_tokens, "static", args.repeats)
                rows.append((f"batch {batch} ({n_prompts} x G={group})", hf, static, hf / static))
        print(f"\nms per token position, model={args.model}, {args.new_tokens} new tokens, CPU with "
              f"{torch.get_num_threads()} thread(s), median of {args.repeats} calls")
        print_table(rows, header=("", "hf", "static", "hf / static"))
        if args.flip_prompts:
            differ, n, margins = greedy_flips(model, processor, split, args.flip_prompts, 32)
            print(f"\ngreedy on the random model, {n} prompts x 32 tokens: {differ} row(s) differ between static "
                  f"and hf" + (f"; top-2 logit margin where they first differ: {', '.join(f'{m:.1e}' for m in margins)}"
                               if margins else ""))


if __name__ == "__main__":
    main()
