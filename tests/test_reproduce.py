"""tools/reproduce.py --dry-run end to end, as a real process: the fixtures prepared by the real preparers, every row's
stages run by their scripts on the tiny model, the report beside the paper's numbers; run again, every stage is
skipped and the report is the same. Then what the report rests on: the interval and the flag on known numbers,
the settings check, each stage's provenance, --rows, and bad input without a traceback. ~1.5 min on 2 CPU cores."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from pathvlm.provenance import answer_code, eval_settings, file_sha256, settings_warnings, weights_fingerprint
from tools import reproduce
from tools.paper import beside_paper, paper_number

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # 13 processes one after another: each alone on the cores
STAGES = [f"{letter} {kind}" for letter in ("base", "α", "β", "γ", "δ", "ε", "R1")
          for kind in ("train", "eval") if (letter, kind) != ("base", "train")]


def reproduce_command(out, *args, timeout=600):
    return subprocess.run([sys.executable, "tools/reproduce.py", "--dry-run", "--out", str(out), *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run twice into one folder: -> (out, first run, its report.md, second run)."""
    out = tmp_path_factory.mktemp("reproduce") / "dry-run"
    first = reproduce_command(out)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    report = (out / "report.md").read_text()
    second = reproduce_command(out, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    return out, first, report, second


def launched(run) -> list[str]:
    return [line for line in run.stdout.splitlines() if line.startswith("$ python")]


def table_rows(markdown: str, heading: str) -> list[str]:
    """The body rows of the markdown table under `heading`: after the heading, a blank line, the header and its rule,
    up to the blank line that ends it."""
    lines = markdown[markdown.index(heading):].splitlines()[4:]
    return lines[:lines.index("")]


def test_dry_run_runs_every_stage_and_reports_beside_the_paper(dry_run):
    out, first, report, _ = dry_run
    scripts = [line.split()[2] for line in launched(first)]
    assert scripts.count("eval.py") == 7 and scripts.count("train_sft.py") == 3 and scripts.count("train_grpo.py") == 3
    assert scripts[:4] == ["tests/pathology_items.py", "data/pathmmu/prepare.py", "tests/omnimedvqa_items.py",
                           "data/omnimedvqa/prepare.py"]
    table_v = table_rows(report, "## Table V: PathMMU")
    assert [row.split(" | ")[0].lstrip("| ") for row in table_v] == ["base", "α", "β", "γ", "δ", "ε", "R1"]
    # every row labelled beside the paper's numbers, which are the paper's (paper.py) and no others
    assert all("| tiny model (dry run), not comparable |" in row for row in table_v)
    assert "| 51.60 |" in table_v[0] and "| 65.50 |" in table_v[6]
    table_iv = table_rows(report, "## Table IV: OmniMedVQA")
    assert "paper 48.60" in table_iv[0] and "paper 80.00" in table_iv[6] and "paper" not in table_iv[1]  # α: none
    results = json.loads((out / "report.json").read_text())
    assert results["dry_run"] and not results["warnings"]  # every row evaluated alike: nothing to warn of
    for row in results["rows"]:
        assert not row["comparable"] and set(row["sets"]) == {"pathmmu", "chest_ct", "isic2020", "oct_c8",
                                                               "diabetic_retinopathy"}
        for name, r in row["sets"].items():
            assert r == beside_paper(r["correct"], r["n"], paper_number("7b", row["row"], name)) and r["n"] == 3


def test_a_second_run_skips_every_finished_stage(dry_run):
    out, _, report, second = dry_run
    assert launched(second) == []  # nothing was run again
    skipped = [line.split(":")[0].removeprefix("skip ") for line in second.stdout.splitlines()
               if line.startswith("skip ")]
    assert skipped == ["data"] + STAGES
    assert (out / "report.md").read_text() == report


def test_each_stage_records_its_provenance(dry_run):
    out = dry_run[0]
    for row in ("base", "alpha", "beta", "gamma", "delta", "epsilon", "r1"):
        for kind in ("train", "eval") if row != "base" else ("eval",):
            folder = out / row / kind
            record = json.loads((folder / "provenance.json").read_text())
            assert record["commit"]["commit"] and record["libraries"]["torch"] and record["device"]
            assert record["config"]["output_dir"] == str(folder) and record["config_sha256"] == file_sha256(
                str(folder / "config.yaml"))
            assert record["data_sha256"] and all(len(sha) == 64 for sha in record["data_sha256"].values())
            assert record["weights"]["model"] == "tiny" and record["command"].startswith("python ")
            if kind == "train":
                assert record["weights"]["adapter"] == weights_fingerprint(str(folder))
                assert record["data_sha256"] == {record["config"]["data"]: file_sha256(record["config"]["data"])}
            else:  # eval.py's own record of what it evaluated, and of its prompt and parser
                assert record["weights"]["adapter"] == weights_fingerprint(record["config"]["adapter"])
                assert json.loads((folder / "metrics.json").read_text())["answer_code"] == answer_code()
            assert record["judge"] == ("rule" if (row, kind) == ("r1", "train") else "none")
    # R1 starts from β's adapter, and says which
    r1 = json.loads((out / "r1" / "train" / "provenance.json").read_text())
    assert r1["weights"]["init_adapter"] == weights_fingerprint(str(out / "beta" / "train"))


def test_the_paper_number_against_our_interval_on_known_numbers():
    # 50/100: Wilson 95% = 0.5 ± 1.96·sqrt(0.25/100 + 1.96²/40000)/(1 + 1.96²/100) = [40.38, 59.62]
    r = beside_paper(50, 100, 51.6)
    assert (round(r["low"], 2), round(r["high"], 2), r["accuracy"], r["paper_is"]) == (40.38, 59.62, 50.0, "inside")
    assert beside_paper(50, 100, 63.9)["paper_is"] == "above" and beside_paper(50, 100, 39.0)["paper_is"] == "below"
    assert beside_paper(50, 100, 59.6)["paper_is"] == "inside" and beside_paper(50, 100, 59.7)["paper_is"] == "above"
    assert beside_paper(50, 100, None)["paper_is"] is None and beside_paper(0, 0, 51.6)["paper_is"] is None
    # more items, a narrower interval: 516/1000 holds 51.6 and not 55.0
    assert beside_paper(516, 1000, 55.0)["paper_is"] == "above"
    assert paper_number("7b", "r1", "isic2020") == 80.0 and paper_number("3b", "r1", "pathmmu") is None
    assert paper_number("7b", "alpha", "chest_ct") is None and paper_number("3b", "epsilon", "pathmmu") == 49.6


def test_settings_that_differ_between_runs_are_warned_of():
    config = {"max_new_tokens": 1024, "max_pixels": 1003520, "quantization": "none", "limit": 0}
    code = {"prompt": "9b56c8c80bec6e82", "parser": "b36b213aebf723f8"}
    same = eval_settings(config, {"answer_code": code}, {"pathmmu": "a" * 64})
    assert settings_warnings({"α": same, "β": dict(same)}) == []
    other = eval_settings({**config, "max_pixels": 401408, "quantization": "4bit"},
                          {"answer_code": {**code, "parser": "0" * 16}}, {"pathmmu": "b" * 64})
    old = eval_settings(config, {})  # evaluated before eval.py recorded its prompt and parser
    warnings = settings_warnings({"α": same, "β": other, "γ": old})
    assert [w.split("**")[1] for w in warnings] == [
        "max_pixels differs between runs", "quantization differs between runs", "prompt not recorded",
        "parser differs between runs", "parser not recorded", "test split pathmmu differs between runs",
        "test split pathmmu not recorded"]
    assert "(α: 1003520, β: 401408, γ: 1003520)" in warnings[0]
    assert "(α: b36b213aebf7, β: 000000000000)" in warnings[3]  # a fingerprint by its first 12 hex digits


def test_report_py_labels_tiny_rows_and_warns_of_other_settings(dry_run, tmp_path):
    from tools import report
    out = dry_run[0]
    other = tmp_path / "alpha-eval"
    shutil.copytree(out / "alpha" / "eval", other)
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["answer_code"]["parser"], metrics["run"] = "0" * 16, "α, parsed otherwise"
    (other / "metrics.json").write_text(json.dumps(metrics))
    markdown = open(report.write_report([str(out / "alpha" / "eval"), str(other)], str(tmp_path / "report"))).read()
    assert "**parser differs between runs**" in markdown and "**prompt differs" not in markdown
    assert "| α (tiny model, not comparable) |" in markdown


def test_rows_subset_resumes_a_stopped_stage_and_reports_only_its_rows(dry_run):
    """β's training as a kill after its last checkpoint leaves it (no final adapter): --rows beta,R1 runs that stage
    alone, train_grpo.py resumes it from its checkpoint, and the rest is skipped (the same weights: the evaluations
    of β and R1's training on them stand)."""
    out = dry_run[0]
    for name in ("adapter_config.json", "adapter_model.safetensors", "preprocessor_config.json"):
        (out / "beta" / "train" / name).unlink()
    subset = reproduce_command(out, "--rows", "beta,R1", timeout=180)
    assert subset.returncode == 0, subset.stderr[-3000:]
    assert "rows β, R1 (and α, trained as their start)" in subset.stdout
    assert [line.split()[2] for line in launched(subset)] == ["train_grpo.py"]
    assert f"resumed from {out / 'beta' / 'train' / 'checkpoints' / 'step_0000001'} at step 1" in subset.stdout
    assert [line.split(":")[0] for line in subset.stdout.splitlines() if line.startswith("skip ")] == [
        "skip data", "skip α train", "skip β eval", "skip R1 train", "skip R1 eval"]
    report = (out / "report.md").read_text()
    assert [row.split(" | ")[0].lstrip("| ") for row in table_rows(report, "## Table V: PathMMU")] == ["β", "R1"]


def test_a_finished_stage_with_other_settings_or_weights_is_refused(dry_run, monkeypatch):
    out = str(dry_run[0])
    spec = reproduce.read_spec(reproduce.SPEC)
    monkeypatch.chdir(ROOT)
    stages = reproduce.plan(["beta"], "tiny", spec, out, os.path.join(out, "data"))
    alpha_train = next(s for s in stages if s.title == "α train")
    longer = alpha_train._replace(overrides={**alpha_train.overrides, "max_steps": 99, "lr": 0.5})
    with pytest.raises(SystemExit, match=r"finished with other settings \(max_steps: 2 there, 99 now, lr: 0.0002 "):
        reproduce.check_finished(longer)
    monkeypatch.setattr(reproduce, "weights_fingerprint", lambda path: "trained-again")
    beta_eval = next(s for s in stages if s.title == "β eval")
    with pytest.raises(SystemExit, match="made from other weights than .* holds now"):
        reproduce.check_finished(beta_eval)


def test_what_would_stop_a_stage_stops_the_plan_first(tmp_path, monkeypatch):
    """Before the first stage, not hours in: a split not prepared, R1's API judge without its key."""
    monkeypatch.chdir(ROOT)
    spec = reproduce.read_spec(reproduce.SPEC)
    stages = reproduce.plan(["r1"], "Qwen/Qwen2.5-VL-7B-Instruct", spec, str(tmp_path / "out"), None)
    assert [s.title for s in stages] == ["α train", "β train", "R1 train", "R1 eval"]
    alpha = stages[0]._replace(overrides={**stages[0].overrides, "data": str(tmp_path / "sft.jsonl")})
    with pytest.raises(reproduce.ConfigError, match=r"α train: data file not found: .*sft.jsonl: prepare it first"):
        reproduce.check_plan([alpha], dry_run=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(reproduce.ConfigError, match=r"R1 train \(configs/grpo_process.yaml\) grades with judge=api, "
                                                    r"whose key is read from \$OPENAI_API_KEY, which is not set"):
        reproduce.check_plan(stages, dry_run=True)  # the data check left out: this machine has no prepared PathMMU


@pytest.mark.parametrize("args, message", [
    (["--rows", "beta,zeta"], "error: --rows: unknown row 'zeta' (did you mean 'beta'?); the rows: base, alpha (α)"),
    (["--rows", ","], "error: --rows: no row named; give e.g. --rows beta,r1"),
    (["--size", "13b"], "argument --size: invalid choice: '13b'"),
])
def test_bad_arguments_stop_with_one_message(args, message, tmp_path):
    done = subprocess.run([sys.executable, "tools/reproduce.py", *args, "--out", str(tmp_path / "out")], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
