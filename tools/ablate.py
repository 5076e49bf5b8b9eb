"""Ablations: named variants x seeds, one table (accuracy mean ± sd, per seed, format rate, completion length,
the reasoning checks and image controls where the eval had them, each other test set's accuracy, CPU minutes,
and the difference from the baseline with its 95% interval and p over seeds and items, Holm-corrected: stats.py).

    python tools/ablate.py configs/ablations/demo.yaml                      # seeds 0 1 2
    python tools/ablate.py configs/ablations/demo.yaml --seeds 0 --out runs/ablate-quick
    python tools/ablate.py configs/ablations/demo.yaml --only "R1 process reward"   # one variant beside the baseline
    python tools/ablate.py configs/ablations/pathmmu.yaml --out runs/ablate-pathmmu  # the 7B on PathMMU (a GPU)
    python tools/ablate.py --power --diff 3 --seed-sd 4 --items 300         # seeds needed for 80% power (simulated)
    python tools/ablate.py configs/ablations/demo.yaml --power --diff 3     # ... with the spreads of the runs in --out

The YAML file's keys (an unknown one stops the run, with a did-you-mean):
    variants      name -> overrides of the GRPO config, as `key=value` would give them. The first is the baseline
                  the others are tested against. Two keys are the runner's own:
                      stage: grpo (default) | sft   sft: train_sft.py with the SFT config and these overrides
                      start: sft (default) | base   from the seed's SFT model, or from the base model
    sft, grpo, eval   the base config of each script (default: configs/demo_sft.yaml, demo_grpo.yaml, demo_eval.yaml)
    defaults      (optional) overrides for every run of a script: {sft: {...}, grpo: {...}, eval: {...}}, e.g. fewer
                  steps for a quick look. The base model is the SFT config's (defaults: {sft: {model: ...}}); the
                  runner passes it, and seed and output_dir, to every run itself
    primary_set   the eval set whose accuracy the table tests (default: the eval config's first set); each other
                  set's mean accuracy gets a column

Every run's config is resolved (config.load_config) for every seed before the first one starts, and every file
they name is looked for (data, eval sets, an adapter to start from): a misspelt key or a missing file in the last
variant stops the ablation at once, not hours in, as a repeated or negative seed does. Per seed, the SFT model is
trained once (the SFT config, seed=s) and shared by every variant that starts from it: a finetune=full SFT writes a
model, which GRPO puts a new LoRA on (the demo); a LoRA SFT writes an adapter, which GRPO trains further (PathMMU's
α -> β). Each stage is the script itself, run as its own process; a variant whose evaluation exists
(<out>/<variant>/seed<s>/eval/metrics.json) is not run again, nor an SFT whose save finished (stages.trained), so an
interrupted ablation goes on where it stopped. Writes <out>/ablation.md and <out>/ablation.png and prints the table.
"""

import argparse
import json
import math
import os
import re
import resource
import statistics
import sys
from typing import NamedTuple

import numpy as np

# run as `python tools/ablate.py`, only tools/ is on sys.path: add the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# config.py's strict YAML reader: a variant named twice would otherwise keep only the last, silently
from pathvlm.allowed import _read_yaml_file, check_value  # noqa: E402
from pathvlm.config import ConfigError, EvalConfig, GRPOConfig, SFTConfig  # noqa: E402
from pathvlm.errors import run_script  # noqa: E402
from pathvlm.evaluation import read_jsonl  # noqa: E402
from tools.stages import as_args, did_you_mean, failed, missing_files, run_to_end, script_config, trained  # noqa: E402
from tools.plots import plot_ablation  # noqa: E402
from tools.stats import Difference, estimate_spreads, holm, power_report, seed_item_test  # noqa: E402

SCRIPTS = {"sft": ("train_sft.py", SFTConfig), "grpo": ("train_grpo.py", GRPOConfig), "eval": ("eval.py", EvalConfig)}
DEMO_CONFIGS = {"sft": "configs/demo_sft.yaml", "grpo": "configs/demo_grpo.yaml", "eval": "configs/demo_eval.yaml"}
YAML_KEYS = ["variants", "defaults", *SCRIPTS, "primary_set"]
RUNNER_KEYS = {"stage": ["grpo", "sft"], "start": ["sft", "base"]}  # the first value is the default
# keys the runner sets in every run of a script: in `defaults` they would be overwritten, so they are refused
SET_BY_RUNNER = {"sft": ["seed", "output_dir"], "grpo": ["seed", "output_dir", "model", "init_adapter"],
                 "eval": ["seed", "output_dir", "model", "adapter"]}


class Ablation(NamedTuple):
    """The YAML file, read and checked."""
    path: str
    variants: dict  # name -> overrides, stage and start included
    configs: dict  # sft / grpo / eval -> the base config's path
    defaults: dict  # sft / grpo / eval -> overrides for every run of that script
    base_model: str  # the SFT config's model: what the SFT trains, and what a LoRA adapter sits on
    sft_full: bool  # the SFT writes a whole model (finetune=full), not a LoRA adapter
    sets: list  # the eval's set names, in its order
    primary: str  # the set whose accuracy the table tests


class Run(NamedTuple):
    stage: str  # sft | grpo | eval
    overrides: dict
    shared: bool  # the seed's SFT model: run once for every variant, its CPU minutes in none of theirs


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_")


def resolve(configs: dict, stage: str, overrides: dict):
    """The config a run of `stage` with these overrides would read (the script's own load_config)."""
    return script_config(SCRIPTS[stage][1], configs[stage], overrides)


def read_ablation(path: str) -> Ablation:
    """The YAML file -> Ablation; anything wrong stops here, named (ConfigError), before a run starts."""
    spec = _read_yaml_file(path) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping with `variants:` at the top level")
    for key in spec:
        if key not in YAML_KEYS:
            raise ConfigError(f"{path}: unknown key '{key}'{did_you_mean(key, YAML_KEYS)}; its keys: "
                              f"{', '.join(YAML_KEYS)}")
    variants = spec.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{path}: expected `variants:`, a mapping of name -> {{key: value}} overrides")
    variants = {str(name): variant or {} for name, variant in variants.items()}  # YAML reads `1:` as an int
    folders = {}  # each variant's runs live in <out>/<its name's A-Z, a-z, 0-9 and _.=->
    for name, variant in variants.items():
        if not isinstance(variant, dict):
            raise ConfigError(f"{path}: variant '{name}': expected a mapping of key: value overrides, got {variant!r}")
        for key, allowed in RUNNER_KEYS.items():
            if variant.get(key, allowed[0]) not in allowed:
                raise ConfigError(f"{path}: variant '{name}': {key}: {variant[key]!r} is not one of "
                                  f"{' | '.join(allowed)}{did_you_mean(variant[key], allowed)}")
        folder = slug(name)
        if not folder:
            raise ConfigError(f"{path}: variant '{name}' has no letter A-Z or digit to name its folder: add a word")
        if folder in folders:
            raise ConfigError(f"{path}: variants '{folders[folder]}' and '{name}' would share the folder "
                              f"<out>/{folder}: rename one")
        folders[folder] = name
    configs = {stage: spec.get(stage, DEMO_CONFIGS[stage]) for stage in SCRIPTS}
    for stage, config in configs.items():
        if not isinstance(config, str) or not os.path.isfile(config):
            raise ConfigError(f"{path}: {stage}: {config!r} is not a config file (e.g. {DEMO_CONFIGS[stage]})")
    defaults = spec.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: defaults: expected {{sft: {{...}}, grpo: {{...}}, eval: {{...}}}}")
    for stage, overrides in defaults.items():
        if stage not in SCRIPTS:
            raise ConfigError(f"{path}: defaults: unknown script '{stage}'{did_you_mean(stage, SCRIPTS)}; "
                              f"its keys: {', '.join(SCRIPTS)}")
        if not isinstance(overrides or {}, dict):
            raise ConfigError(f"{path}: defaults: {stage}: expected a mapping of key: value overrides")
        for key in overrides or {}:
            if key in SET_BY_RUNNER[stage]:
                why = " (the base model is the SFT config's: defaults: {sft: {model: ...}})" if key == "model" else ""
                raise ConfigError(f"{path}: defaults: {stage}: '{key}' is set by tools/ablate.py for each run{why}")
    defaults = {stage: defaults.get(stage) or {} for stage in SCRIPTS}
    try:
        sft, evaluation = resolve(configs, "sft", defaults["sft"]), resolve(configs, "eval", defaults["eval"])
    except ConfigError as e:
        raise ConfigError(f"{path}: defaults: {e}") from None
    sets = [s.partition("=")[0].strip() for s in evaluation.sets]  # name=path.jsonl
    primary = spec.get("primary_set", sets[0])
    if primary not in sets:
        raise ConfigError(f"{path}: primary_set: no set '{primary}' in {configs['eval']}'s sets "
                          f"({', '.join(sets)}){did_you_mean(primary, sets)}")
    return Ablation(path, variants, configs, defaults, sft.model, sft.finetune == "full", sets, primary)


def run_dirs(out: str, name: str, seed: int) -> tuple[str, str, str]:
    root = os.path.join(out, slug(name), f"seed{seed}")
    return root, os.path.join(root, "train"), os.path.join(root, "eval")


def plan(name: str, variant: dict | None, seed: int, out: str, ab: Ablation) -> list[Run]:
    """The runs that train and evaluate one variant for one seed, in order."""
    variant = dict(variant or {})
    stage, start = variant.pop("stage", "grpo"), variant.pop("start", "sft")
    _, train_dir, eval_dir = run_dirs(out, name, seed)
    sft_dir = os.path.join(out, "_sft", f"seed{seed}")
    runs = [Run("sft", {**ab.defaults["sft"], "seed": seed, "output_dir": sft_dir}, True)] if start == "sft" else []
    # the weights a LoRA adapter trained here sits on: a finetune=full SFT's model, else the base model
    under = sft_dir if start == "sft" and ab.sft_full else ab.base_model
    if start == "base":
        start_keys = {"model": under, **({} if stage == "sft" else {"init_adapter": None, "reference": "base"})}
    elif ab.sft_full:  # train_grpo.py takes a full model in init_adapter as its base, with a new LoRA on it
        start_keys = {"model": under} if stage == "sft" else {"init_adapter": sft_dir}
    else:  # the SFT adapter is trained further, by GRPO or by more SFT (configs/sft_more.yaml)
        start_keys = {"model": under, "init_adapter": sft_dir}
    overrides = {**ab.defaults[stage], **start_keys, **variant, "seed": seed, "output_dir": train_dir}
    full = stage == "sft" and resolve(ab.configs, "sft", overrides).finetune == "full"  # its output: a model
    evaluated = {"model": train_dir} if full else {"model": under, "adapter": train_dir}
    return runs + [Run(stage, overrides, False),
                   Run("eval", {**ab.defaults["eval"], **evaluated, "seed": seed, "output_dir": eval_dir}, False)]


def check_variants(ab: Ablation, out: str, seeds: list[int] = (0,)) -> list[str]:
    """Every run's config as its script will read it, for each seed: a wrong key or value stops the ablation now
    (ConfigError). -> the files those configs name that are missing (stages.missing_files), each once as
    "script key: path (the variants that read it)"; what an earlier run of the plan makes (the SFT model) is not
    missing, nor is anything of a variant whose evaluation is done."""
    missing = {}  # (script, key, path) -> who reads it
    for name, variant in ab.variants.items():
        for seed in seeds:
            runs = plan(name, variant, seed, out, ab)
            done = os.path.isfile(os.path.join(run_dirs(out, name, seed)[2], "metrics.json"))
            for run in runs:
                try:
                    cfg = resolve(ab.configs, run.stage, run.overrides)
                except ConfigError as e:
                    raise ConfigError(f"{ab.path}: variant '{name}', {SCRIPTS[run.stage][0]}: {e}") from None
                for key, path in [] if done else missing_files(cfg, [r.overrides["output_dir"] for r in runs]):
                    who = missing.setdefault((SCRIPTS[run.stage][0], key, path), {})
                    who["the shared SFT" if run.shared else f"'{name}'"] = None
    return [f"{script} {key}: {path} ({', '.join(who)})" for (script, key, path), who in missing.items()]


def chosen(ab: Ablation, only: list[str] | None) -> dict:
    """--only's variants and the baseline, which they are tested against (all of them without --only)."""
    unknown = [v for v in only or [] if v not in ab.variants]
    if unknown:
        raise ConfigError(f"--only: no variant {unknown[0]!r} in {ab.path}{did_you_mean(unknown[0], ab.variants)}; "
                          f"its variants: {', '.join(ab.variants)}")
    baseline = next(iter(ab.variants))
    return {k: v for k, v in ab.variants.items() if not only or k == baseline or k in only}


def run(script: str, config: str, overrides: dict) -> float:
    """python <script> <config> key=value ... in its own process, to its end -> the CPU minutes it used."""
    command = [sys.executable, script, config, *as_args(overrides)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    code, stopped = run_to_end(command)
    if stopped:
        sys.exit("\nstopped: run the same command again to go on (finished variants are skipped, the stopped stage "
                 "resumes from what it saved)")
    if code != 0:
        sys.exit(failed(command, code, "the variants already finished"))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 60


def run_variant(name: str, variant: dict | None, seed: int, out: str, ab: Ablation) -> dict:
    """Train and evaluate one variant for one seed (unless its evaluation exists) -> its summary."""
    root, _, eval_dir = run_dirs(out, name, seed)
    if not os.path.isfile(os.path.join(eval_dir, "metrics.json")):
        minutes = 0.0
        for stage, overrides, shared in plan(name, variant, seed, out, ab):
            if shared and trained(overrides["output_dir"]):
                continue
            used = run(SCRIPTS[stage][0], ab.configs[stage], overrides)
            minutes += 0.0 if shared else used
        with open(os.path.join(root, "cpu_minutes.json"), "w") as f:
            json.dump({"cpu_minutes": minutes}, f)
    with open(os.path.join(eval_dir, "metrics.json")) as f:
        sets = json.load(f)["sets"]
    if ab.primary not in sets:
        raise SystemExit(f"error: {eval_dir} holds sets {', '.join(sets)}, not {ab.primary}: it was evaluated under "
                         f"another eval config; move {root} away to run the variant again")
    metrics = sets[ab.primary]
    with open(os.path.join(root, "cpu_minutes.json")) as f:
        minutes = json.load(f)["cpu_minutes"]
    correct = {(seed, p["id"]): bool(p["correct"]) for p in read_jsonl(os.path.join(eval_dir, "predictions.jsonl"))
               if p.get("set", ab.primary) == ab.primary}
    controls = metrics.get("controls", {})
    return {"accuracy": 100 * metrics["accuracy"], "format_rate": metrics["format_rate"],
            "length": metrics["mean_completion_tokens"], "cpu_minutes": minutes, "correct": correct,
            # the reasoning checks (evaluation.score) and the image-reliance controls, where the eval had them
            "image_right": metrics.get("image_stated_right"), "agrees": metrics.get("reasoning_agrees"),
            # the kinds of question the set holds; on open ones accuracy is exact match, F1 their partial credit
            "kinds": metrics.get("kinds", {"closed": len(correct)}), "open_f1": metrics.get("open_f1"),
            **{c: 100 * controls[c]["accuracy"] if "accuracy" in controls.get(c, {}) else None
               for c in ("blank", "shuffled")},
            "sets": {n: 100 * m["accuracy"] for n, m in sets.items() if n != ab.primary}}  # the other sets


def mean_or_dash(values: list, scale: float = 1.0, digits: int = 0) -> str:
    """The mean of the seeds' values as a percentage, or – where an evaluation did not measure it."""
    return "–" if None in values else f"{scale * statistics.mean(values):.{digits}f}"


def answers(runs_per_model: list[list[dict]], seeds: list[int]) -> np.ndarray:
    """Each model's runs (one per seed) -> (models, seeds, items) right/wrong: row s from seed s's SFT model
    in every model, columns the items every run answered, in one order."""
    ids = sorted(set.intersection(*({i for _, i in r["correct"]} for runs in runs_per_model for r in runs)))
    return np.array([[[r["correct"][(s, i)] for i in ids] for s, r in zip(seeds, runs)] for runs in runs_per_model])


def difference_cells(d: Difference, p_holm: float) -> str:
    """The table's two test columns: difference in points (95% interval) | Holm-corrected p."""
    if d.seeds < 2:  # one trained model per variant: its training randomness is not measured
        return f"{d.diff:+.1f} (1 seed: no interval) | –"
    if math.isnan(d.p):  # no test: no variation seen, or a missing answer (stats.seed_item_test's note)
        return f"{d.diff:+.1f} ({d.note}) | –"
    note = f"; {d.note}" if d.note else ""
    return f"{d.diff:+.1f} ({d.low:+.1f} to {d.high:+.1f}{note}) | {p_holm:.2g}"


def table(results: dict[str, list[dict]], seeds: list[int]) -> str:
    """The accuracy columns and the test are the primary set's; each other set the eval had, its mean accuracy
    in a column of its own (before CPU min, so the test's columns stay last)."""
    baseline = next(iter(results))
    tests = {name: seed_item_test(*answers([results[baseline], runs], seeds)) for name, runs in results.items()
             if name != baseline}
    # every variant is tested against the same baseline: Holm keeps the chance of any false positive at 5%
    p_holm = dict(zip(tests, holm([t.p for t in tests.values()])))
    others = list(results[baseline][0].get("sets", {}))
    opened = any(r.get("open_f1") is not None for runs in results.values() for r in runs)  # open questions: F1
    lines = ["| variant | accuracy % (mean ± sd) | per seed " + " / ".join(map(str, seeds)) + " | format | tokens | "
             + "open F1 % | " * opened
             + "image stated right % | reasoning agrees % | blank image % | shuffled image % | "
             + "".join(f"{name} % | " for name in others) +
             "CPU min | difference vs baseline (95% CI) | p (Holm) |", "|---" * (12 + opened + len(others)) + "|"]
    for name, runs in results.items():
        acc = [r["accuracy"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        test = "- | -" if name == baseline else difference_cells(tests[name], p_holm[name])
        lines.append(f"| {name} | {statistics.mean(acc):.1f} ± {sd:.1f} | {' / '.join(f'{a:.1f}' for a in acc)} | "
                     f"{statistics.mean(r['format_rate'] for r in runs):.2f} | "
                     f"{statistics.mean(r['length'] for r in runs):.1f} | "
                     + f"{mean_or_dash([r.get('open_f1') for r in runs], 100, 1)} | " * opened +
                     f"{mean_or_dash([r['image_right'] for r in runs], 100)} | "
                     f"{mean_or_dash([r['agrees'] for r in runs], 100)} | "
                     f"{mean_or_dash([r['blank'] for r in runs])} | {mean_or_dash([r['shuffled'] for r in runs])} | "
                     + "".join(f"{mean_or_dash([r.get('sets', {}).get(other) for r in runs], digits=1)} | "
                               for other in others) +
                     f"{statistics.mean(r['cpu_minutes'] for r in runs):.1f} | {test} |")
    return "\n".join(lines)


def answers_of_runs(ab: Ablation, out: str, seeds: list[int]) -> tuple[np.ndarray, str]:
    """--power with the variants file: the answers of the variants already run in `out` for every seed ->
    (models, seeds, items), the baseline first, and a line saying what they are."""
    paths = {n: [os.path.join(run_dirs(out, n, s)[2], "predictions.jsonl") for s in seeds] for n in ab.variants}
    names = [n for n in paths if all(map(os.path.isfile, paths[n]))]
    if len(names) < 2 or names[0] != next(iter(ab.variants)) or len(seeds) < 3:
        sys.exit(f"error: --power estimates the spreads from the runs in {out}: it needs the baseline and a variant "
                 f"evaluated for 3 or more seeds; for seeds {' '.join(map(str, seeds))} it finds "
                 f"{', '.join(names) or 'none'}. Run the ablation first, or leave out the variants file and give the "
                 "spreads yourself")
    runs = [[{"correct": {(s, p["id"]): bool(p["correct"]) for p in read_jsonl(f)
                          if p.get("set", ab.primary) == ab.primary}} for s, f in zip(seeds, paths[n])] for n in names]
    return answers(runs, seeds), f"{len(names)} variants x {len(seeds)} seeds in {out}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="?", help="YAML file: variants (name -> overrides), optional configs, defaults "
                                               "and primary_set (this docstring)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--only", nargs="+", metavar="VARIANT",
                   help="run these variants only (and the baseline, the YAML's first, which they are tested against)")
    power = p.add_argument_group("--power: how many seeds an ablation needs, from stats.simulate (no training). "
                                 "With the variants file, what is not given is estimated from the runs in --out")
    power.add_argument("--power", action="store_true", help="print the seeds needed for 80%% power and stop")
    power.add_argument("--diff", type=float, default=3.0, help="the true difference to detect, accuracy points")
    power.add_argument("--items", type=int, help="test items (default: the runs', else 300)")
    power.add_argument("--seed-sd", type=float, help="sd over seeds of a variant's accuracy, points (4)")
    power.add_argument("--shared", type=float,
                       help="correlation of two variants' per-seed accuracies through the shared SFT model (0.8)")
    power.add_argument("--item-sd", type=float, help="sd of item difficulty, logit scale (stats.simulate's item_sd; 3)")
    power.add_argument("--seed-item-sd", type=float,
                       help="sd of what one seed's SFT model knows of each item, logit scale: the noise the seeds "
                       "share (stats.simulate's sft_item_sd; 3); larger needs more seeds")
    power.add_argument("--sims", type=int, default=400, help="simulated ablations per seed count")
    power.add_argument("--max-seeds", type=int, default=40)
    args = p.parse_args(argv)
    if args.variants is None and not args.power:
        p.error("the variants YAML is required (e.g. configs/ablations/demo.yaml), unless --power")
    if args.variants and not os.path.isfile(args.variants):
        sys.exit(f"error: {args.variants} not found (e.g. configs/ablations/demo.yaml)")
    twice = sorted({seed for seed in args.seeds if args.seeds.count(seed) > 1})
    if twice:  # one model counted twice would shrink the sd and the test's interval
        sys.exit(f"error: --seeds: {' '.join(map(str, twice))} given twice: each seed is one trained model, and the "
                 "mean, sd and test need different ones")
    try:
        for seed in args.seeds:  # here, not in the first script that reads it
            check_value("seed", seed, "--seeds")
        ab = read_ablation(args.variants) if args.variants else None
        if not args.power:
            ab = ab._replace(variants=chosen(ab, args.only))
            missing = check_variants(ab, args.out, args.seeds)
            if missing:
                raise ConfigError(f"{ab.path}: files not found, before any run: {'; '.join(missing)}. "
                                  "Prepare them (docs/datasets.md) or fix the paths")
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if args.power:  # what is not given, estimated from the variants already run with this file
        models, source = answers_of_runs(ab, args.out, args.seeds) if ab else (None, "")
        given = {"seed_sd": args.seed_sd, "shared": args.shared, "item_sd": args.item_sd,
                 "sft_item_sd": args.seed_item_sd, "items": args.items}
        return print(power_report(args.diff, given, estimate_spreads(models) if ab else {}, source, args.sims,
                                  args.max_seeds))

    results = {name: [run_variant(name, variant, seed, args.out, ab) for seed in args.seeds]
               for name, variant in ab.variants.items()}
    markdown = table(results, args.seeds)
    os.makedirs(args.out, exist_ok=True)
    other_sets = [name for name in ab.sets if name != ab.primary]
    columns = f"; {', '.join(f'{name} %' for name in other_sets)}: mean accuracy on that set" if other_sets else ""
    kinds = next(iter(results.values()))[0]["kinds"]
    seen = ", ".join(f"{kind} {n}" for kind, n in kinds.items())
    if "open" in kinds:  # what accuracy means on a set with open questions
        seen += ("; on an open question accuracy is an exact match after openqa.normalise, open F1 its token F1 "
                 "(partial credit)")
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(f"Ablations of {args.variants}, seeds {' '.join(map(str, args.seeds))}: accuracy and its test on the "
                f"{ab.primary} set ({seen}){columns}\n\n{markdown}\n\n![accuracy](ablation.png)\n")
    print(f"{ab.primary}: {seen}")
    plot_ablation({name: [r["accuracy"] for r in runs] for name, runs in results.items()},
                  os.path.join(args.out, "ablation.png"), ab.primary)
    print(markdown)
    print(f"wrote {args.out}/ablation.md and ablation.png")


if __name__ == "__main__":
    run_script(main)
