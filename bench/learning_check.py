"""Does GRPO improve on SFT? The demo pipeline over several seeds, with the table at the end.

    python bench/learning_check.py                       # seeds 0 1 2, ~5 minutes a seed on 2 CPU cores
    python bench/learning_check.py --seeds 0 --out runs/check

For each seed: SFT (configs/demo_sft.yaml, seed=s) -> GRPO (configs/demo_grpo.yaml, seed=s) and greedy
test accuracy of the base model, the SFT model and SFT+GRPO on the demo test split, and the GRPO stage's
wall time. Runs are resumable (each stage skips what its output_dir already holds). Extra `key=value`
arguments go to each stage with --sft / --grpo / --eval, e.g. the sampler against its reference:

    python bench/learning_check.py --out runs/check_hf --grpo sampler=hf --eval sampler=hf
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def script(*args: str):
    """One of the project's scripts in its own process, as a user runs it (no script imports another)."""
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def accuracy(out_dir: str, extra: list[str], **keys) -> float:
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.isfile(path):
        script("eval.py", "configs/demo_eval.yaml", f"output_dir={out_dir}", *[f"{k}={v}" for k, v in keys.items()],
               *extra)
    with open(path) as f:
        return 100 * json.load(f)["accuracy"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/learning_check")
    p.add_argument("--sft", nargs="*", default=[], help="extra key=value for train_sft.py")
    p.add_argument("--grpo", nargs="*", default=[], help="extra key=value for train_grpo.py")
    p.add_argument("--eval", nargs="*", default=[], help="extra key=value for eval.py")
    args = p.parse_args()

    rows = []
    for seed in args.seeds:
        root = os.path.join(args.out, f"seed{seed}")
        sft_dir, grpo_dir = os.path.join(root, "sft"), os.path.join(root, "grpo")
        if not os.path.isfile(os.path.join(sft_dir, "config.json")):
            script("train_sft.py", "configs/demo_sft.yaml", f"seed={seed}", f"output_dir={sft_dir}", *args.sft)
        grpo_s = None  # the GRPO stage's wall time, start-up included (when it ran in this call)
        if not os.path.isfile(os.path.join(grpo_dir, "adapter_config.json")):
            start = time.perf_counter()
            script("train_grpo.py", "configs/demo_grpo.yaml", f"seed={seed}", f"init_adapter={sft_dir}",
                   f"output_dir={grpo_dir}", *args.grpo)
            grpo_s = round(time.perf_counter() - start, 1)
        # the base model of the demo is the random-init tiny-small of the same seed
        row = {"seed": seed, "base": accuracy(os.path.join(root, "eval_base"), args.eval, seed=seed),
               "sft": accuracy(os.path.join(root, "eval_sft"), args.eval, model=sft_dir),
               "grpo": accuracy(os.path.join(root, "eval_grpo"), args.eval, model=sft_dir, adapter=grpo_dir),
               "grpo_s": grpo_s}
        rows.append(row)
        print(json.dumps(row))

    print("\n| seed | base | SFT | GRPO | GRPO - SFT | GRPO stage (s) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['base']:.1f} | {r['sft']:.1f} | {r['grpo']:.1f} | {r['grpo'] - r['sft']:+.1f} "
              f"| {r['grpo_s'] if r['grpo_s'] is not None else '(earlier run)'} |")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("base", "sft", "grpo")}
    print(f"| mean | {mean['base']:.1f} | {mean['sft']:.1f} | {mean['grpo']:.1f} | {mean['grpo'] - mean['sft']:+.1f} |")
    gains = [r["grpo"] - r["sft"] for r in rows]
    spread = f", sd {statistics.stdev(gains):.1f}" if len(gains) > 1 else ""
    print(f"\nGRPO - SFT: min {min(gains):+.1f} (seed {rows[gains.index(min(gains))]['seed']}), "
          f"max {max(gains):+.1f}{spread} points over {len(gains)} seed(s)")


if __name__ == "__main__":
    main()
