"""eval.py and tools/report.py: statistics checked by hand, evaluation end to end on the tiny real model."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from pathvlm import evaluation
from pathvlm.config import EvalConfig, parse_args
from tools import report, stats
from eval import run
from pathvlm.evaluation import evaluate, load_sets, read_predictions, score, set_metrics
from pathvlm.model import load_model
from pathvlm.records import Record, load_split

OPTIONS = ["brown", "blue", "mixed"]


# ----------------------------------------------------------------------------------------------
# Statistics

def test_wilson_hand_values():
    # 8/10, z = 1.96: z² = 3.8416, 1 + z²/n = 1.38416, centre = (0.8 + 0.19208)/1.38416 = 0.71674,
    # half = 1.96·sqrt(0.016 + 0.009604)/1.38416 = 0.22658  ->  (0.4902, 0.9433)
    assert evaluation.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # 0/10: centre = half = 0.19208/1.38416 = 0.13877  ->  (0, 0.2775); 10/10 is its mirror image
    assert evaluation.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert evaluation.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert evaluation.wilson_interval(0, 0) == (0.0, 1.0)


@given(st.integers(1, 400), st.data())
def test_wilson_contains_the_estimate(n, data):
    k = data.draw(st.integers(0, n))
    low, high = evaluation.wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_mcnemar_textbook():
    # Wikipedia's McNemar example: a = 101, b = 121, c = 59, d = 33 (only b and c matter).
    # chi² with continuity correction = (|121 - 59| - 1)² / (121 + 59) = 3721/180 = 20.672;
    # chi²(1) = Z², z = sqrt(20.672) = 4.5467, two-sided normal tail 2·Q(4.5467) = 5.45e-6
    a = [True] * 101 + [True] * 121 + [False] * 59 + [False] * 33
    b = [True] * 101 + [False] * 121 + [True] * 59 + [False] * 33
    t = stats.mcnemar(a, b)
    assert (t.b, t.c) == (121, 59)
    assert t.p_chi2 == pytest.approx(5.45e-6, rel=2e-3)
    assert 1e-6 < t.p_exact < 1e-5  # exact and asymptotic agree in order at n = 180
    # small case by hand: b = 1, c = 9, n = 10. Exact: 2·(C(10,0) + C(10,1))/2^10 = 22/1024;
    # chi² = (8 - 1)²/10 = 4.9, between the table's 3.841 (p .05) and 5.024 (p .025): p = 0.0269
    t = stats.mcnemar([True] + [False] * 9 + [True] * 5, [False] + [True] * 9 + [True] * 5)
    assert (t.b, t.c) == (1, 9)
    assert t.p_exact == pytest.approx(22 / 1024, rel=1e-12)
    assert t.p_chi2 == pytest.approx(0.0269, abs=1e-4)
    swapped = stats.mcnemar([False] + [True] * 9 + [True] * 5, [True] + [False] * 9 + [True] * 5)
    assert (swapped.b, swapped.c, swapped.p_exact, swapped.p_chi2) == (9, 1, t.p_exact, t.p_chi2)
    assert stats.mcnemar([True, False], [True, False]) == (0, 0, 1.0, 1.0)
    # thousands of discordant pairs: no under/overflow, exact ≈ normal approximation
    big = stats.mcnemar([True] * 600 + [False] * 620, [False] * 600 + [True] * 620)
    assert big.p_exact == pytest.approx(big.p_chi2, rel=1e-3)


def test_score_empty_and_unparseable_count_as_wrong():
    r = Record(id="x", image="x.png", question="Which stain dominates this patch?", options=OPTIONS, answer="B")
    assert score("", r) == {"kind": "closed", "parsed": None, "correct": False}
    assert score("the patch looks blue, I think", r) == {"kind": "closed", "parsed": None, "correct": False}
    assert score("<answer>A) blue</answer>", r) == {"kind": "closed", "parsed": None, "correct": False}  # letter and text disagree
    assert score("<think>blue</think><answer>C) mixed</answer>", r) == {"kind": "closed", "parsed": "C", "correct": False}
    assert score("<think>blue</think><answer>B) blue</answer>", r) == {"kind": "closed", "parsed": "B", "correct": True}
    preds = [{"completion": c, **score(c, r), "completion_tokens": 4}
             for c in ["", "blue?", "<think>blue</think><answer>B) blue</answer>"]]
    m = set_metrics(preds)
    assert (m["n"], m["correct"], m["unparseable"]) == (3, 1, 2)
    assert m["format_rate"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------
# Evaluation on the tiny model

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from a second thread, and two threads on a busy 2-core machine
    (a training run beside the tests) spin-wait: one batch took 16 s instead of 0.2 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return load_model(EvalConfig(model="tiny"), trainable=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """pathmmu.jsonl (8 records) and chest_ct.jsonl (4), real PNG patches beside them."""
    root = tmp_path_factory.mktemp("data")
    os.makedirs(root / "images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, count in [("pathmmu", 8), ("chest_ct", 4)]:
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(count):
                pixels = rng.integers(0, 256, (56 + 28 * (i % 3), 56, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "images" / f"{name}-{i}.png")
                rec = {"id": f"{name}-{i:03d}", "image": f"images/{name}-{i}.png",
                       "question": "Which stain dominates this patch?", "options": OPTIONS, "answer": "ABC"[i % 3]}
                f.write(json.dumps(rec) + "\n")
        paths[name] = str(root / f"{name}.jsonl")
    return paths


def eval_cfg(data, out, **kw):
    sets = [f"{name}={path}" for name, path in data.items()]
    kw = {"batch_size": 3, "max_new_tokens": 12, **kw}
    return EvalConfig(model="tiny", sets=sets, output_dir=str(out), **kw)


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_eval_end_to_end(tiny, data, tmp_path):
    out = tmp_path / "base"
    # through the command-line parser, as `python eval.py key=value ...` would
    cfg = parse_args(EvalConfig, ["model=tiny", f"output_dir={out}", "max_new_tokens=12", "batch_size=3",
                                  f"sets=[pathmmu={data['pathmmu']}, chest_ct={data['chest_ct']}]"])
    metrics = run(cfg, *tiny)
    with open(out / "metrics.json") as f:
        assert json.load(f) == json.loads(json.dumps(metrics))
    assert metrics["run"] == "base" and metrics["model"] == "tiny" and metrics["adapter"] is None
    assert list(metrics["sets"]) == ["pathmmu", "chest_ct"]
    assert metrics["accuracy"] == metrics["sets"]["pathmmu"]["accuracy"]
    preds = read_lines(out / "predictions.jsonl")
    assert os.path.isfile(out / "config.yaml")
    for name, n in [("pathmmu", 8), ("chest_ct", 4)]:
        m, mine = metrics["sets"][name], [p for p in preds if p["set"] == name]
        assert sorted(p["id"] for p in mine) == [f"{name}-{i:03d}" for i in range(n)]
        assert m["n"] == n == m["generated"]
        assert m["correct"] == sum(p["correct"] for p in mine)
        assert m["unparseable"] == sum(p["parsed"] is None for p in mine)
        assert 0.0 <= m["format_rate"] <= 1.0 and m["items_per_s"] > 0
        assert m["ci_low"] <= m["accuracy"] <= m["ci_high"]
        assert all(1 <= p["completion_tokens"] <= 12 for p in mine)
        assert m["mean_completion_tokens"] == pytest.approx(sum(p["completion_tokens"] for p in mine) / n)
        assert all(p["correct"] == (p["parsed"] == p["gold"]) for p in mine)
        records = {r.id: r for r in load_split(data[name])}
        for p in mine:  # the texts a confusion matrix compares: the gold option and the parsed one
            options = records[p["id"]].options
            assert p["gold_text"] == options["ABCDEFGH".index(p["gold"])]
            assert p["parsed_text"] == (None if p["parsed"] is None else options["ABCDEFGH".index(p["parsed"])])


def test_eval_base_matches_evaluate_in_process(tiny, data, tmp_path):
    """run() loading the model itself (its fresh LoRA switched off) answers as the in-memory model."""
    metrics = run(eval_cfg(data, tmp_path / "own", limit=2))
    records = load_sets([f"pathmmu={data['pathmmu']}"], limit=2)
    sets = evaluate(*tiny, records, batch_size=2, max_new_tokens=12, log=lambda *a: None)
    assert sets["pathmmu"]["n"] == 2 and sets["pathmmu"]["generated"] == 2
    own = [p["completion"] for p in read_lines(tmp_path / "own" / "predictions.jsonl") if p["set"] == "pathmmu"]
    again = evaluate(*tiny, records, batch_size=2, max_new_tokens=12, predictions_path=str(tmp_path / "p.jsonl"),
                     log=lambda *a: None)
    assert [p["completion"] for p in read_lines(tmp_path / "p.jsonl")] == own
    assert again["pathmmu"]["correct"] == metrics["sets"]["pathmmu"]["correct"]


def test_resume_skips_done_items_and_redoes_a_cut_line(tiny, data, tmp_path):
    out = tmp_path / "resume"
    first = run(eval_cfg(data, out, limit=3), *tiny)
    assert first["sets"]["pathmmu"]["generated"] == 3 and first["sets"]["chest_ct"]["n"] == 3
    path = out / "predictions.jsonl"
    done = path.read_text()
    # a kill in the middle of writing the next line
    with open(path, "a") as f:
        f.write('{"id": "pathmmu-003", "set": "pathmmu", "completion": "<thi')
    second = run(eval_cfg(data, out), *tiny)
    assert second["sets"]["pathmmu"]["generated"] == 5  # 003 is redone, 000-002 are not
    assert second["sets"]["chest_ct"]["generated"] == 1
    assert path.read_text().startswith(done)
    preds = read_lines(path)
    keys = [(p["set"], p["id"]) for p in preds]
    assert len(keys) == len(set(keys)) == 12
    assert second["sets"]["pathmmu"]["n"] == 8
    assert second["sets"]["pathmmu"]["correct"] == sum(p["correct"] for p in preds if p["set"] == "pathmmu")
    # a cut in the middle of a line that is then the last one: that item is redone
    text = path.read_text()
    path.write_text(text[: len(text) - 20])
    assert len(read_predictions(str(path))) == 11 and path.read_text().endswith("\n")
    third = run(eval_cfg(data, out), *tiny)
    assert sum(m["generated"] for m in third["sets"].values()) == 1
    assert len(read_lines(path)) == 12
    # predictions of another model or budget are not mixed in
    with pytest.raises(SystemExit, match="max_new_tokens"):
        run(eval_cfg(data, out, max_new_tokens=20), *tiny)


def test_weights_trained_again_into_the_same_dir_are_not_mixed_in(data, tmp_path):
    """Same adapter path, same config, new weights (trained again): resuming would mix two models'
    answers in one metrics.json, so eval stops and says why; the same weights resume as before."""
    import eval as eval_script

    model, _ = load_model(EvalConfig(model="tiny"))  # a fresh LoRA, trainable
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    out = tmp_path / "out"
    cfg = eval_cfg(data, out, adapter=str(adapter), limit=2)
    run(cfg)
    assert run(cfg)["sets"]["pathmmu"]["generated"] == 0  # unchanged weights: nothing to redo
    copied = tmp_path / "copied"
    shutil.copytree(adapter, copied)  # a copy (new mtimes) is the same weights
    assert eval_script.weights_fingerprint(str(copied)) == eval_script.weights_fingerprint(str(adapter))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01)
    model.save_pretrained(adapter)
    with pytest.raises(SystemExit, match=r"other weights than those now in adapter .*adapter \(trained again"):
        run(cfg)


def test_missing_files_are_named(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/test.jsonl"):
        load_sets([f"x={tmp_path}/nowhere/test.jsonl"])
    broken = tmp_path / "broken.jsonl"
    rec = {"id": "a", "image": "images/gone.png", "question": "q?", "options": OPTIONS, "answer": "A"}
    broken.write_text(json.dumps(rec) + "\n")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_sets([f"b={broken}"])
    with pytest.raises(SystemExit, match="gone.png"):
        run(EvalConfig(model="tiny", sets=[f"b={broken}"], output_dir=str(tmp_path / "r")))
    with pytest.raises(ValueError, match="name=path"):
        load_sets([data["pathmmu"]])


def test_judge_hook_stops_before_generating(data, tmp_path, monkeypatch):
    """An unset API key or a missing judges.py: a clear exit before any generation. The judge's
    scores themselves are checked in test_eval_judge.py."""
    with pytest.raises(SystemExit, match="PATHVLM_TEST_UNSET_KEY"):
        run(eval_cfg(data, tmp_path / "j1", judge="api", judge_api_key_env="PATHVLM_TEST_UNSET_KEY"))
    assert not os.path.exists(tmp_path / "j1" / "predictions.jsonl")
    with pytest.raises(SystemExit, match="unknown judge 'gpt'"):
        run(eval_cfg(data, tmp_path / "j2", judge="gpt"))
    monkeypatch.setitem(sys.modules, "pathvlm.judges", None)  # as if pathvlm/judges.py were not there
    with pytest.raises(SystemExit, match="judges.py"):
        run(eval_cfg(data, tmp_path / "j3", judge="api"))


# ----------------------------------------------------------------------------------------------
# Reports

def test_report_from_two_tiny_runs(tiny, data, tmp_path):
    run(eval_cfg(data, tmp_path / "a", run_name="base"), *tiny)
    run(eval_cfg(data, tmp_path / "b", limit=5), *tiny)
    report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "report")])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| base |" in md and "| b |" in md
    assert "pathmmu (PathMMU)" in md and "chest_ct (Chest CT Scan)" in md
    assert "| paper: PathVLM-R1 | 65.50 | 44.00 |" in md
    assert "| base | b | pathmmu | 5 |" in md and "| base | b | chest_ct | 4 |" in md
    with Image.open(tmp_path / "report" / "accuracy.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    # what a reader must know: the runs answered different items, and a tiny model sits beside the paper's 7B
    assert "**limit differs between runs** (base: 0, b: 5)" in md and "base, b: the embedded tiny model" in md
    # the report replaces the one there, pictures included
    (tmp_path / "report" / "confusion_gone-run.png").write_bytes(b"a picture of a run no longer in the report")
    report.main([str(tmp_path / "a"), "--out", str(tmp_path / "report")])
    assert not (tmp_path / "report" / "confusion_gone-run.png").exists()
    assert "differs between runs" not in (tmp_path / "report" / "report.md").read_text()


def test_mcnemar_table_pairs_by_set_and_id(tmp_path):
    """Hand-made runs: A answered 10 items, B those 10 and 2 more; B's file was cut mid-line."""
    a_right = [1, 1, 1, 1, 0, 0, 0, 1, 1, 0]
    b_right = [1, 0, 0, 0, 0, 1, 0, 1, 1, 0, 1, 1]  # b = A only: 3, c = B only: 1 on the shared 10
    for name, right in [("A", a_right), ("B", b_right)]:
        os.makedirs(tmp_path / name)
        preds = [{"id": f"q{i}", "set": "pathmmu", "correct": bool(x)} for i, x in enumerate(right)]
        with open(tmp_path / name / "predictions.jsonl", "w") as f:
            f.write("".join(json.dumps(p) + "\n" for p in preds) + '{"id": "q1')
        n, k = len(right), sum(right)
        lo, hi = evaluation.wilson_interval(k, n)
        sets = {"pathmmu": {"n": n, "correct": k, "accuracy": k / n, "ci_low": lo, "ci_high": hi}}
        with open(tmp_path / name / "metrics.json", "w") as f:
            json.dump({"run": name, "accuracy": k / n, "sets": sets}, f)
    runs = [report.load_run(str(tmp_path / n)) for n in "AB"]
    row = report.mcnemar_table(runs).splitlines()[2:]  # after the header and its rule
    # 2·(C(4,0) + C(4,1))/2^4 = 10/16 = 0.625; chi² = (2 - 1)²/4 = 0.25 -> p = 0.617
    assert row == ["| A | B | pathmmu | 10 | 60.0 | 40.0 | 3 | 1 | 0.625 | 0.617 |"]


def write_run(run_dir, name: str, set_name: str, pairs: list[tuple[str, str | None]]):
    """An eval output_dir by hand: one prediction per (gold text, predicted text or None)."""
    os.makedirs(run_dir)
    preds = [{"id": f"q{i}", "set": set_name, "correct": g == p, "gold_text": g, "parsed_text": p}
             for i, (g, p) in enumerate(pairs)]
    with open(run_dir / "predictions.jsonl", "w") as f:
        f.write("".join(json.dumps(p) + "\n" for p in preds))
    k, n = sum(p["correct"] for p in preds), len(preds)
    lo, hi = evaluation.wilson_interval(k, n)
    with open(run_dir / "metrics.json", "w") as f:
        json.dump({"run": name, "sets": {set_name: {"n": n, "correct": k, "accuracy": k / n, "ci_low": lo,
                                                    "ci_high": hi}}}, f)


def test_confusion_matrix_for_fixed_labels_and_list_otherwise(tmp_path):
    stains = [("blue", "mixed")] * 7 + [("blue", "blue")] * 3 + [("brown", "brown")] * 10 + [("mixed", None)] * 2
    write_run(tmp_path / "sft", "sft", "demo", stains)
    # 30 different gold texts: no fixed label set, so a list of the most frequent confusions
    free = [(f"diagnosis {i}", f"diagnosis {i}") for i in range(30)] + [("diagnosis 3", "diagnosis 7")] * 4
    write_run(tmp_path / "mmu", "mmu", "pathmmu", free + [("diagnosis 1", None)])
    runs = [report.load_run(str(tmp_path / n)) for n in ("sft", "mmu")]
    assert runs[0]["confusion"]["demo"] == {("blue", "mixed"): 7, ("blue", "blue"): 3, ("brown", "brown"): 10,
                                            ("mixed", "unparsed"): 2}
    assert report.confusion_labels(runs[0]["confusion"]["demo"]) == ["blue", "brown", "mixed"]
    assert report.confusion_labels(runs[1]["confusion"]["pathmmu"]) is None
    assert report.top_confusions(runs[1]["confusion"]["pathmmu"]).splitlines()[2:] == [
        "| diagnosis 3 | diagnosis 7 | 4 | 11.4 |", "| diagnosis 1 | unparsed | 1 | 2.9 |"]
    md = open(report.write_report([str(tmp_path / "sft"), str(tmp_path / "mmu")], str(tmp_path / "out"))).read()
    assert "![sft on demo: gold vs predicted](confusion_sft_demo.png)" in md
    assert "**mmu on pathmmu**: most frequent confusions" in md and "| diagnosis 3 | diagnosis 7 | 4 |" in md
    with Image.open(tmp_path / "out" / "confusion_sft_demo.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert not os.path.exists(tmp_path / "out" / "confusion_mmu_pathmmu.png")


def test_report_draws_the_training_runs_main_curves(tmp_path):
    write_run(tmp_path / "eval", "grpo", "demo", [("blue", "blue")])
    os.makedirs(tmp_path / "grpo")
    rows = [{"step": s, "reward/total": s / 10, "kl": 0.01 * s, "gen_tokens_per_s": 100.0} for s in range(1, 5)]
    (tmp_path / "grpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.main([str(tmp_path / "eval"), "--train", str(tmp_path / "grpo"), "--out", str(tmp_path / "out")])
    assert "![grpo training curves](curves_grpo.png)" in (tmp_path / "out" / "report.md").read_text()
    # only the main curves, in MAIN_CURVES' order: throughput is left to `tools/report.py curves`
    assert report.plot_curves(str(tmp_path / "grpo" / "metrics.jsonl"), str(tmp_path / "c.png"),
                              report.MAIN_CURVES) == ["reward/total", "kl"]
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        report.main([str(tmp_path / "eval"), "--train", str(tmp_path / "eval"), "--out", str(tmp_path / "o2")])


def test_curves_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward/format": s / 10, "reward/accuracy": 0.3, "loss": 1 / (s + 1), "kl": 0.01 * s,
             "phase": "grpo", "done": False} for s in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 10, "lo')
    keys = report.plot_curves(str(path), str(tmp_path / "curves.png"))
    assert keys == ["reward/format", "reward/accuracy", "loss", "kl"]
    report.main(["curves", str(path), "--out", str(tmp_path / "cli.png")])
    for png in ["curves.png", "cli.png"]:
        with Image.open(tmp_path / png) as im:
            assert im.format == "PNG"


def test_a_prompt_over_max_prompt_len_is_skipped_and_counted(tiny, data, tmp_path):
    """A question of ~100,000 characters (a 50 MB one ran out of memory): skipped before generation, counted in
    metrics.json and named on the console; the other items are answered."""
    rows = [json.loads(line) for line in open(data["pathmmu"])][:3]
    rows[1]["question"] = "Which stain dominates this patch? " * 3000
    split = os.path.join(os.path.dirname(data["pathmmu"]), "long_question.jsonl")
    with open(split, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    metrics = run(eval_cfg({"long": split}, tmp_path / "out", max_prompt_len=512), *tiny)
    assert metrics["sets"]["long"]["skipped_too_long"] == 1 and metrics["sets"]["long"]["n"] == 2
    answered = [p["id"] for p in read_lines(tmp_path / "out" / "predictions.jsonl")]
    assert answered == [rows[0]["id"], rows[2]["id"]]
