"""Ablations on the demo: named variants x seeds, one table (accuracy mean ± sd, per seed, format rate,
completion length, the reasoning checks and image controls where the eval had them, CPU minutes, and the
difference from the baseline with its 95% interval and p over seeds and items, Holm-corrected: stats.py).

    python ablate.py configs/ablations/demo.yaml                      # seeds 0 1 2
    python ablate.py configs/ablations/demo.yaml --seeds 0 --out runs/ablate-quick
    python ablate.py configs/ablations/demo.yaml --only "R1 process reward"   # one variant beside the baseline
    python ablate.py --power --diff 3 --seed-sd 4 --items 300         # seeds needed for 80% power (simulated)

The YAML's `variants` maps a name to overrides of configs/demo_grpo.yaml, as `key=value` would give them.
Two keys are the runner's own:
    stage: grpo (default) | sft   sft: train_sft.py with configs/demo_sft.yaml and these overrides instead
    start: sft (default) | base   from the seed's demo SFT model, or from the base (the random-init tiny-small)
The first variant is the baseline the others are tested against. `defaults` (optional) holds overrides for
every run of a script: {sft: {...}, grpo: {...}, eval: {...}}, e.g. fewer steps for a quick look.

Per seed, the demo SFT model is trained once (configs/demo_sft.yaml, seed=s) and shared by every variant
that starts from it. Each stage is the script itself, run as its own process; a variant whose evaluation
exists (<out>/<variant>/seed<s>/eval/metrics.json) is not run again, so an interrupted ablation goes on
where it stopped. Writes <out>/ablation.md and <out>/ablation.png and prints the table.
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys

import numpy as np
import yaml

from evaluation import read_jsonl
from stats import Difference, holm, seed_item_test, seeds_needed

def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_")


def run(script: str, config: str, overrides: dict) -> float:
    """python <script> <config> key=value ... in its own process -> the CPU minutes it used."""
    args = [f"{k}={'null' if v is None else json.dumps(v) if isinstance(v, (dict, list)) else v}"
            for k, v in overrides.items()]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"$ python {script} {config} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, script, config, *args], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 60


def run_variant(name: str, spec: dict, seed: int, out: str, defaults: dict) -> dict:
    """Train and evaluate one variant for one seed (unless its evaluation exists) -> its summary."""
    spec = dict(spec)
    stage, start = spec.pop("stage", "grpo"), spec.pop("start", "sft")
    root = os.path.join(out, slug(name), f"seed{seed}")
    train_dir, eval_dir = os.path.join(root, "train"), os.path.join(root, "eval")
    sft_dir = os.path.join(out, "_sft", f"seed{seed}")
    base_model = defaults.get("sft", {}).get("model", "tiny-small")  # configs/demo_sft.yaml's
    minutes = 0.0
    if not os.path.isfile(os.path.join(eval_dir, "metrics.json")):
        if start == "sft" and not os.path.isfile(os.path.join(sft_dir, "config.json")):
            run("train_sft.py", "configs/demo_sft.yaml",  # shared by the variants: not counted in theirs
                {**defaults.get("sft", {}), "seed": seed, "output_dir": sft_dir})
        start_model = sft_dir if start == "sft" else base_model
        if stage == "sft":  # the demo SFT trains the whole language model: its output is a model
            minutes += run("train_sft.py", "configs/demo_sft.yaml", {**defaults.get("sft", {}), **spec, "seed": seed,
                                                                     "model": start_model, "output_dir": train_dir})
            evaluated = {"model": train_dir}
        else:
            start_keys = ({"init_adapter": sft_dir} if start == "sft"
                          else {"model": base_model, "init_adapter": None, "reference": "base"})
            minutes += run("train_grpo.py", "configs/demo_grpo.yaml", {**defaults.get("grpo", {}), **start_keys,
                                                                       **spec, "seed": seed, "output_dir": train_dir})
            evaluated = {"model": start_model, "adapter": train_dir}
        minutes += run("eval.py", "configs/demo_eval.yaml", {**defaults.get("eval", {}), **evaluated, "seed": seed,
                                                             "output_dir": eval_dir})
        with open(os.path.join(root, "cpu_minutes.json"), "w") as f:
            json.dump({"cpu_minutes": minutes}, f)
    with open(os.path.join(eval_dir, "metrics.json")) as f:
        metrics = json.load(f)["sets"]["demo"]
    with open(os.path.join(root, "cpu_minutes.json")) as f:
        minutes = json.load(f)["cpu_minutes"]
    correct = {(seed, p["id"]): bool(p["correct"]) for p in read_jsonl(os.path.join(eval_dir, "predictions.jsonl"))}
    controls = metrics.get("controls", {})
    return {"accuracy": 100 * metrics["accuracy"], "format_rate": metrics["format_rate"],
            "length": metrics["mean_completion_tokens"], "cpu_minutes": minutes, "correct": correct,
            # the reasoning checks (evaluation.score) and the image-reliance controls, where the eval had them
            "image_right": metrics.get("image_stated_right"), "agrees": metrics.get("reasoning_agrees"),
            **{c: 100 * controls[c]["accuracy"] if "accuracy" in controls.get(c, {}) else None
               for c in ("blank", "shuffled")}}


def mean_or_dash(values: list, scale: float = 1.0) -> str:
    """The mean of the seeds' values as a percentage, or – where an evaluation did not measure it."""
    return "–" if None in values else f"{scale * statistics.mean(values):.0f}"


def paired(base_runs: list[dict], runs: list[dict], seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The baseline's and a variant's answers as (seeds, items) right/wrong arrays: row s from seed s's SFT
    model in both, columns the items every run answered, in one order."""
    ids = sorted(set.intersection(*({i for _, i in r["correct"]} for r in base_runs + runs)))
    return tuple(np.array([[r["correct"][(s, i)] for i in ids] for s, r in zip(seeds, rs)]) for rs in (base_runs, runs))


def difference_cells(d: Difference, p_holm: float) -> str:
    """The table's two test columns: difference in points (95% interval) | Holm-corrected p."""
    if d.seeds < 2:  # one trained model per variant: its training randomness is not measured
        return f"{d.diff:+.1f} (1 seed: no interval) | –"
    return f"{d.diff:+.1f} ({d.low:+.1f} to {d.high:+.1f}) | {p_holm:.2g}"


def table(results: dict[str, list[dict]], seeds: list[int]) -> str:
    baseline = next(iter(results))
    tests = {name: seed_item_test(*paired(results[baseline], runs, seeds)) for name, runs in results.items()
             if name != baseline}
    # every variant is tested against the same baseline: Holm keeps the chance of any false positive at 5%
    p_holm = dict(zip(tests, holm([t.p for t in tests.values()])))
    lines = ["| variant | accuracy % (mean ± sd) | per seed " + " / ".join(map(str, seeds)) + " | format | tokens | "
             "image stated right % | reasoning agrees % | blank image % | shuffled image % | "
             "CPU min | difference vs baseline (95% CI) | p (Holm) |", "|---" * 12 + "|"]
    for name, runs in results.items():
        acc = [r["accuracy"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        test = "- | -" if name == baseline else difference_cells(tests[name], p_holm[name])
        lines.append(f"| {name} | {statistics.mean(acc):.1f} ± {sd:.1f} | {' / '.join(f'{a:.1f}' for a in acc)} | "
                     f"{statistics.mean(r['format_rate'] for r in runs):.2f} | "
                     f"{statistics.mean(r['length'] for r in runs):.1f} | "
                     f"{mean_or_dash([r['image_right'] for r in runs], 100)} | "
                     f"{mean_or_dash([r['agrees'] for r in runs], 100)} | "
                     f"{mean_or_dash([r['blank'] for r in runs])} | {mean_or_dash([r['shuffled'] for r in runs])} | "
                     f"{statistics.mean(r['cpu_minutes'] for r in runs):.1f} | {test} |")
    return "\n".join(lines)


def power_table(diff: float, seed_sd: float, items: int, shared: float, sims: int, max_seeds: int) -> str:
    """--power: seeds needed for 80% power at 5% (stats.seeds_needed), with the power at each count tried."""
    needed, tried = seeds_needed(diff, seed_sd, items, sims=sims, max_seeds=max_seeds, shared=shared)
    lines = [f"true difference {diff:g} points, seed sd {seed_sd:g} points per variant ({shared:.0%} of it shared "
             f"through the seed's SFT model), {items} items; {sims} simulated ablations per row", "seeds  power"]
    lines += [f"{n:5d}  {power:.2f}" for n, power in tried]
    lines.append(f"{needed} seeds per variant give 80% power" if needed else
                 f"more than {max_seeds} seeds per variant: 80% power is out of reach")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    for i, name in enumerate(names):
        acc = [r["accuracy"] for r in results[name]]
        ax.bar(i, statistics.mean(acc), color="#9bb7d4")
        ax.scatter([i] * len(acc), acc, color="black", s=12, zorder=3)  # one dot per seed
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("demo test accuracy (%)")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="?", help="YAML file: variants (name -> overrides) and optional defaults")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--only", nargs="+", metavar="VARIANT",
                   help="run these variants only (and the baseline, the YAML's first, which they are tested against)")
    power = p.add_argument_group("--power: how many seeds an ablation needs, from stats.simulate (no training)")
    power.add_argument("--power", action="store_true", help="print the seeds needed for 80%% power and stop")
    power.add_argument("--diff", type=float, default=3.0, help="the true difference to detect, accuracy points")
    power.add_argument("--seed-sd", type=float, default=4.0, help="sd over seeds of a variant's accuracy, points")
    power.add_argument("--items", type=int, default=300, help="test items")
    power.add_argument("--shared", type=float, default=0.8,
                       help="correlation of two variants' per-seed accuracies through the shared SFT model")
    power.add_argument("--sims", type=int, default=400, help="simulated ablations per seed count")
    power.add_argument("--max-seeds", type=int, default=40)
    args = p.parse_args(argv)
    if args.power:
        print(power_table(args.diff, args.seed_sd, args.items, args.shared, args.sims, args.max_seeds))
        return
    if args.variants is None:
        p.error("the variants YAML is required (e.g. configs/ablations/demo.yaml), unless --power")
    if not os.path.isfile(args.variants):
        sys.exit(f"error: {args.variants} not found (e.g. configs/ablations/demo.yaml)")
    with open(args.variants) as f:
        spec = yaml.safe_load(f) or {}
    if not isinstance(spec.get("variants"), dict) or not spec["variants"]:
        sys.exit(f"error: {args.variants}: expected `variants:`, a mapping of name -> {{key: value}} overrides")

    variants = spec["variants"]
    if args.only:
        unknown = [v for v in args.only if v not in variants]
        if unknown:
            sys.exit(f"error: --only: no variant {unknown[0]!r} in {args.variants}; its variants: {', '.join(variants)}")
        baseline = next(iter(variants))
        variants = {k: v for k, v in variants.items() if k == baseline or k in args.only}
    results = {}
    try:
        for name, overrides in variants.items():
            results[name] = [run_variant(name, overrides or {}, seed, args.out, spec.get("defaults", {}))
                             for seed in args.seeds]
    except subprocess.CalledProcessError as e:  # the script has printed why; finished variants are kept
        sys.exit(f"error: `{' '.join(e.cmd[1:3])} ...` failed (exit {e.returncode}); run the same command again "
                 "to go on from the variants already finished")
    markdown = table(results, args.seeds)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(f"Ablations of {args.variants}, seeds {' '.join(map(str, args.seeds))}\n\n{markdown}\n\n"
                "![accuracy](ablation.png)\n")
    plot(results, os.path.join(args.out, "ablation.png"))
    print(markdown)
    print(f"wrote {args.out}/ablation.md and ablation.png")


if __name__ == "__main__":
    main()
