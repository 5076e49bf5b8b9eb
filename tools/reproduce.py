"""The paper's table in one command: its rows trained, evaluated on PathMMU and the four OmniMedVQA sets, and
reported beside Tables IV and V.

    python tools/reproduce.py --size 7b                      # every row: base, α, β, γ, δ, ε, R1 (one GPU)
    python tools/reproduce.py --size 3b --rows beta,gamma    # a subset (the rows they start from are trained too)
    python tools/reproduce.py --dry-run                      # the tiny model on fixtures in the real formats (CPU)

Each row is the configs/ file its docs/paper-table.md line names (ROWS below), run by its own script in its own process,
as tools/ablate.py runs its stages: nothing here trains or evaluates. A stage whose output is complete is skipped
and said so (a training run's final adapter, an evaluation's metrics.json); a stage that was stopped resumes
through the script's own resume (checkpoints, predictions.jsonl) when the same command runs again. A finished
stage whose saved config differs from this run's is refused, with the keys named: another --out keeps both.
configs/reproduce.yaml says which model each --size is, which sets are evaluated, and what --dry-run changes.

Writes <out>/report.md and report.json: per row and set our accuracy with its Wilson 95% interval beside the
paper's number, and whether the paper's lies inside, above or below it; a warning wherever rows were evaluated
with other settings (max_new_tokens, prompt, parser, quantization, image budget, test splits); each row's
provenance (commit, library versions, sha256 of the data splits, weight fingerprints, judge, configs), which
is recorded in <out>/<row>/{train,eval}/provenance.json as each stage ends.
"""

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from typing import NamedTuple

import yaml

# run as `python tools/reproduce.py`, only tools/ is on sys.path: add the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# config.py's strict YAML reader: a key written twice in configs/reproduce.yaml would otherwise keep the last
from pathvlm.allowed import _read_yaml_file  # noqa: E402
from pathvlm.config import ConfigError, EvalConfig, GRPOConfig, SFTConfig, load_config  # noqa: E402
from pathvlm.errors import run_script  # noqa: E402
from pathvlm.provenance import eval_settings, is_tiny, stage_record, weights_fingerprint  # noqa: E402
from tools.paper import PAPER_COLUMNS, PAPER_ROWS, beside_paper, paper_number, write_report  # noqa: E402
from tools.stages import as_args, did_you_mean, failed, run_to_end, script_config, trained  # noqa: E402

SPEC = "configs/reproduce.yaml"
EVAL_CONFIG = "configs/eval.yaml"
SCRIPTS = {"train_sft.py": SFTConfig, "train_grpo.py": GRPOConfig, "eval.py": EvalConfig}
DRY_RUN_PART = {"train_sft.py": "sft", "train_grpo.py": "grpo"}  # configs/reproduce.yaml's dry_run sections


class Row(NamedTuple):
    name: str  # on the command line and as the folder
    letter: str  # as the paper writes it
    recipe: str
    script: str | None  # the training script; None: the base model, evaluated as it is
    config: str | None
    start: str | None  # the row whose adapter this one trains further


# The paper's rows, in its order (docs/paper-table.md; paper.py's PAPER_ROWS maps them to Tables IV and V).
ROWS = {row.name: row for row in [
    Row("base", "base", "the base model, no training", None, None, None),
    Row("alpha", "α", "SFT on the 3,000 SFT items", "train_sft.py", "configs/sft.yaml", None),
    Row("beta", "β", "α + GRPO (format + accuracy) on the 1,000 RL items", "train_grpo.py", "configs/grpo.yaml",
        "alpha"),
    Row("gamma", "γ", "α + more SFT on the same RL items", "train_sft.py", "configs/sft_more.yaml", "alpha"),
    Row("delta", "δ", "SFT on the RL items, from the base", "train_sft.py", "configs/sft_rl_items.yaml", None),
    Row("epsilon", "ε", "GRPO on the RL items, from the base", "train_grpo.py", "configs/grpo_from_base.yaml", None),
    Row("r1", "R1", "β + GRPO with the process reward (PathVLM-R1)", "train_grpo.py", "configs/grpo_process.yaml",
        "beta"),
]}
ROW_ALIASES = {**{r.name: r.name for r in ROWS.values()}, **{r.letter.lower(): r.name for r in ROWS.values()}}


class Stage(NamedTuple):
    row: str
    kind: str  # train | eval
    script: str
    config: str
    overrides: dict
    output_dir: str

    @property
    def title(self) -> str:
        return f"{ROWS[self.row].letter} {self.kind}"


def parse_rows(text: str | None) -> list[str]:
    """"beta,r1" (names or the paper's letters, any case) -> row names in the paper's order; every row if None."""
    if text is None:
        return list(ROWS)
    asked = [word.strip() for word in text.replace(" ", ",").split(",") if word.strip()]
    if not asked:
        raise ConfigError("--rows: no row named; give e.g. --rows beta,r1")
    for word in asked:
        if word.lower() not in ROW_ALIASES:
            raise ConfigError(f"--rows: unknown row '{word}'{did_you_mean(word.lower(), ROW_ALIASES)}; the rows: "
                              + ", ".join(f"{r.name} ({r.letter})" if r.letter != r.name else r.name
                                          for r in ROWS.values()))
    wanted = {ROW_ALIASES[word.lower()] for word in asked}
    return [name for name in ROWS if name in wanted]


def read_spec(path: str) -> dict:
    """configs/reproduce.yaml, checked: sizes, sets, dry_run (its sections: all, train, sft, grpo, r1, eval)."""
    spec = _read_yaml_file(path) or {}
    sections = {"sizes": dict, "sets": list, "dry_run": dict}
    for key in spec:
        if key not in sections:
            raise ConfigError(f"{path}: unknown key '{key}'{did_you_mean(key, sections)}; its keys: "
                              + ", ".join(sections))
    for key, kind in sections.items():
        if not isinstance(spec.get(key), kind):
            raise ConfigError(f"{path}: '{key}' must be a {kind.__name__} (see the comments in {SPEC})")
    parts = ("all", "train", "sft", "grpo", "r1", "eval")
    for part, overrides in spec["dry_run"].items():
        if part not in parts or not isinstance(overrides or {}, dict):
            raise ConfigError(f"{path}: dry_run: '{part}' is not one of {', '.join(parts)}{did_you_mean(part, parts)}, "
                              "each a mapping of key: value overrides")
    return spec


def resolve(stage: Stage):
    """The config the stage's script will read (config.load_config, as the script does)."""
    return script_config(SCRIPTS[stage.script], stage.config, stage.overrides)


def relocate(path: str | None, data_dir: str | None) -> str | None:
    """A dry run reads its fixtures: data/<dataset>/prepared/<file> -> <data_dir>/<dataset>/<file>."""
    parts = os.path.normpath(path).split(os.sep) if path else []
    if data_dir is None or len(parts) != 4 or parts[0] != "data" or parts[2] != "prepared":
        return path
    return os.path.join(data_dir, parts[1], parts[3])


def plan(rows: list[str], model: str, spec: dict, out: str, data_dir: str | None) -> list[Stage]:
    """The stages of these rows, and of the rows they start from (trained, not evaluated), in the paper's order."""
    needed = set(rows)
    for name in reversed(list(ROWS)):  # R1 needs β, which needs α
        if name in needed and ROWS[name].start:
            needed.add(ROWS[name].start)
    dry = spec["dry_run"] if data_dir else {}
    sets = dict(s.split("=", 1) for s in load_config(EvalConfig, EVAL_CONFIG).sets)
    missing = [name for name in spec["sets"] if name not in sets]
    if missing:
        raise ConfigError(f"{SPEC}: sets: {', '.join(missing)} not among {EVAL_CONFIG}'s sets ({', '.join(sets)})")
    stages = []
    for row in (ROWS[name] for name in ROWS if name in needed):
        train_dir = os.path.join(out, row.name, "train")
        if row.script:
            parts = ["all", "train", DRY_RUN_PART[row.script]] + (["r1"] if row.name == "r1" else [])
            overrides = {"model": model, **{k: v for part in parts for k, v in (dry.get(part) or {}).items()},
                         "output_dir": train_dir}
            if row.start:
                overrides["init_adapter"] = os.path.join(out, row.start, "train")
            stage = Stage(row.name, "train", row.script, row.config, overrides, train_dir)
            data = resolve(stage).data
            stages.append(stage._replace(overrides={**overrides, "data": relocate(data, data_dir)}))
        if row.name in rows:
            overrides = {"model": model, **(dry.get("all") or {}), **(dry.get("eval") or {}),
                         "adapter": train_dir if row.script else None, "run_name": row.letter,
                         "sets": [f"{name}={relocate(sets[name], data_dir)}" for name in spec["sets"]],
                         "output_dir": os.path.join(out, row.name, "eval")}
            stages.append(Stage(row.name, "eval", "eval.py", EVAL_CONFIG, overrides, overrides["output_dir"]))
    return stages


def check_plan(stages: list[Stage], dry_run: bool):
    """Everything that would stop a stage at its start, before the first one runs (hours in, on a GPU): each
    config as its script reads it, the prepared splits, the judge's API key."""
    for stage in stages:
        try:
            cfg = resolve(stage)
        except ConfigError as e:
            raise ConfigError(f"{stage.title} ({stage.script} {stage.config}): {e}") from None
        files = ([cfg.data, cfg.eval_data] if stage.kind == "train" else [s.split("=", 1)[1] for s in cfg.sets])
        for path in [f for f in files if f] if not dry_run else []:  # a dry run writes its own, next
            if not os.path.isfile(path):
                parts = os.path.normpath(path).split(os.sep)
                how = (f"python data/{parts[1]}/prepare.py ... (its docstring; docs/datasets.md)"
                       if len(parts) > 2 and parts[0] == "data" else "prepare it first (docs/datasets.md)")
                raise ConfigError(f"{stage.title}: data file not found: {path}: {how}")
        uses_api = getattr(cfg, "judge", "none") == "api" and (stage.kind == "eval" or "process" in cfg.rewards)
        if uses_api and not os.environ.get(cfg.judge_api_key_env):
            raise ConfigError(f"{stage.title} ({stage.config}) grades with judge=api, whose key is read from "
                              f"${cfg.judge_api_key_env}, which is not set: export {cfg.judge_api_key_env}=... first, "
                              f"or leave the row out with --rows")


# ----------------------------------------------------------------------------------------------
# Stages: finished, or run

def finished(stage: Stage) -> bool:
    """A training run's output is complete (stages.trained: the file it writes last is there); an evaluation
    writes metrics.json once every answer is in."""
    if stage.kind == "eval":
        return os.path.isfile(os.path.join(stage.output_dir, "metrics.json"))
    return trained(stage.output_dir)


# keys a finished stage may have run with other values of: where it wrote, how it logged, checkpointed and reached
# its judge, and the eval's batch size and label. Any other key makes it another experiment than the one planned
MAY_DIFFER = {"output_dir", "resume", "save_every", "keep_checkpoints", "sample_every", "log_groups", "tensorboard",
              "max_bad_steps", "collective_timeout", "device", "run_name", "judge_concurrency", "judge_timeout",
              "judge_deadline", "judge_max_retries", "judge_cache_dir", "judge_max_failure_share",
              "judge_failure_window"}


def comparable(value):
    """Paths compared by where they lead (runs/x and ./runs/x are one), sets' name=path entries likewise."""
    if isinstance(value, list):
        return [comparable(v) for v in value]
    if isinstance(value, str) and "=" in value and os.path.exists(value.split("=", 1)[1]):
        name, path = value.split("=", 1)
        return f"{name}={os.path.realpath(path)}"
    return os.path.realpath(value) if isinstance(value, str) and os.path.exists(value) else value


def check_finished(stage: Stage):
    """Refuse a finished stage whose saved config is not this run's (another --size into the same --out), or an
    evaluation of weights that were trained again since (eval.py's weights.json against the adapter now)."""
    with open(os.path.join(stage.output_dir, "config.yaml")) as f:
        saved = yaml.safe_load(f) or {}
    planned = json.loads(json.dumps(dataclasses.asdict(resolve(stage))))  # tuples -> lists, as YAML gives them
    changed = [k for k in planned if k not in MAY_DIFFER and k in saved
               and comparable(saved[k]) != comparable(planned[k])]
    if changed:
        listed = ", ".join(f"{k}: {saved[k]!r} there, {planned[k]!r} now" for k in changed)
        raise SystemExit(f"error: {stage.title} in {stage.output_dir} finished with other settings ({listed}): give "
                         "another --out, or delete that folder to run the stage again")
    # the weights it started from: eval.py's weights.json, or the init_adapter's fingerprint in provenance.json
    start = stage.overrides.get("adapter" if stage.kind == "eval" else "init_adapter")
    record = os.path.join(stage.output_dir, "weights.json" if stage.kind == "eval" else "provenance.json")
    if start and os.path.isfile(record):
        with open(record) as f:
            saved = json.load(f)
        then = saved.get("adapter") if stage.kind == "eval" else saved["weights"].get("init_adapter")
        if then != weights_fingerprint(start):
            raise SystemExit(f"error: {stage.title} in {stage.output_dir} was made from other weights than {start} "
                             "holds now (trained again since?): delete that folder to run the stage again")


def run(command: list[str]) -> float:
    """One stage's script in its own process, to its end (stages.run_to_end) -> its wall-clock seconds."""
    start = time.time()
    code, stopped = run_to_end(command)
    if stopped:
        raise SystemExit("\nstopped: run the same command again to go on (finished stages are skipped, the stopped "
                         "one resumes from what it saved)")
    if code != 0:
        raise SystemExit(failed(command, code, "the stages already finished"))
    return time.time() - start


def record_provenance(stage: Stage, command: list[str], seconds: float):
    """<output_dir>/provenance.json: what made this stage's output, written as it ends."""
    record = stage_record(resolve(stage), stage.kind, stage.output_dir, ["python", *command[1:]], seconds)
    with open(os.path.join(stage.output_dir, "provenance.json"), "w") as f:
        json.dump({"stage": stage.title, "config_file": stage.config, **record}, f, indent=1, ensure_ascii=False)


def read_provenance(stage: Stage) -> dict:
    path = os.path.join(stage.output_dir, "provenance.json")
    if not os.path.isfile(path):  # finished by the script run by hand, or by an older tools/reproduce.py
        return {"stage": stage.title, "recorded": False}
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# --dry-run's data: fixtures in the real formats, prepared by the real preparers

def prepare_dry_run_data(data_dir: str):
    """PathMMU's data.json + images.zip (tests/pathology_items.py: ten pathology questions) and OmniMedVQA's
    folder (tests/omnimedvqa_items.py: three items a set), each through its real preparer: PathMMU dealt
    4 SFT / 3 RL / 3 test items."""
    raw = os.path.join(data_dir, "raw")
    if all(os.path.isfile(os.path.join(data_dir, d, "report.json")) for d in ("pathmmu", "omnimedvqa")):
        print(f"skip data: {data_dir} holds the prepared fixtures")
        return
    python = sys.executable
    run([python, "tests/pathology_items.py", os.path.join(raw, "PathMMU")])
    run([python, "data/pathmmu/prepare.py", "--data-json", os.path.join(raw, "PathMMU", "data.json"), "--images",
         os.path.join(raw, "PathMMU", "images.zip"), "--subsets", "PubMed", "--sft-size", "4", "--rl-size", "3",
         "--out", os.path.join(data_dir, "pathmmu")])
    run([python, "tests/omnimedvqa_items.py", os.path.join(raw, "OmniMedVQA")])
    run([python, "data/omnimedvqa/prepare.py", "--root", os.path.join(raw, "OmniMedVQA"), "--out",
         os.path.join(data_dir, "omnimedvqa")])


# ----------------------------------------------------------------------------------------------
# The report

def row_result(row: str, stages: list[Stage], size: str, dry_run: bool) -> dict:
    """One row of the report: its accuracies beside the paper's, its eval settings, its provenance (its own
    stages and those of the rows it starts from)."""
    chain, name = [], row
    while name:  # R1's chain: α train, β train, R1 train, R1 eval
        chain = [s for s in stages if s.row == name and (s.kind == "train" or name == row)] + chain
        name = ROWS[name].start
    evaluation = next(s for s in chain if s.kind == "eval")
    with open(os.path.join(evaluation.output_dir, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(evaluation.output_dir, "config.yaml")) as f:
        config = yaml.safe_load(f) or {}
    provenance = [read_provenance(s) for s in chain]
    tiny = is_tiny(config.get("model"))
    results = {}
    for set_name in PAPER_COLUMNS:
        m = metrics["sets"].get(set_name)
        results[set_name] = None if m is None else beside_paper(m["correct"], m["n"], paper_number(size, row, set_name))
    return {"row": row, "letter": ROWS[row].letter, "recipe": ROWS[row].recipe, "model": config.get("model"),
            "comparable": not tiny, "label": ("tiny model (dry run), not comparable" if dry_run else
                                              "tiny model, not comparable") if tiny else config.get("model"),
            "paper_row": PAPER_ROWS.get(size, {}).get(row), "sets": results,
            "settings": eval_settings(config, metrics, provenance[-1].get("data_sha256")),
            "provenance": provenance}


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="see the docstring at the top")
    p.add_argument("--size", choices=["7b", "3b"], default="7b", help="the paper's model (configs/reproduce.yaml)")
    p.add_argument("--rows", help="a subset, e.g. beta,r1 (names or letters: base alpha beta gamma delta epsilon r1)")
    p.add_argument("--dry-run", action="store_true", help="the tiny model on fixtures, a few steps a stage (CPU)")
    p.add_argument("--out", help="output folder (default: runs/reproduce/<size>, or runs/reproduce/dry-run)")
    args = p.parse_args(argv)
    if not os.path.isfile(SPEC):  # the configs' data paths and the scripts are relative to the repository root
        sys.exit(f"error: {SPEC} not found here: run tools/reproduce.py from the repository root")
    out = args.out or os.path.join("runs", "reproduce", "dry-run" if args.dry_run else args.size)
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"error: --out {out} is a file: give a folder")
    command = shlex.join(["python", "tools/reproduce.py", *(sys.argv[1:] if argv is None else argv)])

    # 1. the plan: the rows asked for and the rows they start from, every config read as its script will read it
    data_dir = os.path.join(out, "data") if args.dry_run else None
    try:
        rows = parse_rows(args.rows)
        spec = read_spec(SPEC)
        if args.size not in spec["sizes"]:
            raise ConfigError(f"{SPEC}: sizes: no model for --size {args.size}")
        stages = plan(rows, spec["sizes"][args.size], spec, out, data_dir)
        check_plan(stages, args.dry_run)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    starts = [ROWS[s.row].letter for s in stages if s.row not in rows]
    print(f"rows {', '.join(ROWS[r].letter for r in rows)}" + (f" (and {', '.join(starts)}, trained as their start)"
                                                              if starts else "") + f": {len(stages)} stages in {out}")

    # 2. the dry run's data, prepared by the real preparers from fixtures in the datasets' own formats
    if data_dir:
        prepare_dry_run_data(data_dir)

    # 3. each stage: skipped when its output is complete, else run (resuming what an earlier run saved)
    for stage in stages:
        if finished(stage):
            check_finished(stage)
            print(f"skip {stage.title}: {stage.output_dir} is finished")
            continue
        command_line = [sys.executable, stage.script, stage.config, *as_args(stage.overrides)]
        seconds = run(command_line)
        record_provenance(stage, command_line, seconds)

    # 4. the report: Tables V and IV beside the paper's, the settings that differ, each row's provenance
    results = [row_result(r, stages, args.size, args.dry_run) for r in rows]
    markdown = write_report(results, out, args.size, args.dry_run, command)
    print(markdown)
    print(f"wrote {out}/report.md and report.json")


if __name__ == "__main__":
    run_script(main)
