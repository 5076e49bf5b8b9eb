"""tools/ablate.py on the tiny model: variants x seeds run the real scripts (the demo's configs, and the 7B's on
PathMMU-format fixtures), share the SFT model, skip what is finished, and the table holds every column it
promises, the primary set's test and a column per other set; a mistake in the YAML stops it, named."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tools.ablate import check_variants, main, read_ablation, run_variant, slug, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ablation_runs_variants_shares_sft_and_skips_what_is_done(demo_data, tmp_path):
    spec = {
        "variants": {"baseline": {}, "kl_coef=0": {"kl_coef": 0, "reference": "none"},
                     "γ more SFT": {"stage": "sft", "data": f"{demo_data}/rl.jsonl", "max_steps": 2}},
        "defaults": {
            "sft": {"model": "tiny", "data": f"{demo_data}/sft.jsonl", "eval_data": None, "max_steps": 3,
                    "batch_size": 4, "save_every": 0},
            "grpo": {"data": f"{demo_data}/rl.jsonl", "max_steps": 1, "num_prompts": 2, "group_size": 2,
                     "max_new_tokens": 8, "eval_data": None, "save_every": 0},
            "eval": {"sets": [f"demo={demo_data}/test.jsonl"], "limit": 6, "max_new_tokens": 8}}}
    path, out = tmp_path / "ablate.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "tools/ablate.py", str(path), "--seeds", "0", "--out", str(out)]
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    launched = [line for line in first.stdout.splitlines() if line.startswith("$ python")]
    sft_output = f"output_dir={out / '_sft' / 'seed0'}"
    assert sum(line.endswith(sft_output) for line in launched) == 1  # the shared SFT model, trained once
    assert sum("eval.py" in line for line in launched) == 3
    table = first.stdout[first.stdout.index("| variant"):].splitlines()
    assert [row.split(" | ")[0].lstrip("| ") for row in table[2:5]] == ["baseline", "kl_coef=0", "γ more SFT"]
    assert table[2].endswith("| - | - |") and "(1 seed: no interval) | – |" in table[3]  # one seed: no test
    assert (out / "ablation.md").is_file() and (out / "ablation.png").stat().st_size > 0
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "$ python" not in again.stdout  # everything was done: nothing runs
    assert again.stdout[again.stdout.index("| variant"):] == first.stdout[first.stdout.index("| variant"):]
    # a save cut short: transformers wrote config.json first, half the weights, the image processor not yet.
    # Before, config.json alone counted as trained: the GRPO runs failed on the cut weights, every time
    sft_dir = out / "_sft" / "seed0"
    (sft_dir / "preprocessor_config.json").unlink()
    weights = next(sft_dir.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    shutil.rmtree(out / "baseline")
    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [line.split()[2] for line in resumed.stdout.splitlines() if line.startswith("$ python")] == [
        "train_sft.py", "train_grpo.py", "eval.py"]  # the SFT saved again, the baseline run on it
    assert (sft_dir / "preprocessor_config.json").is_file()


def test_ablation_of_pathmmu_configs_tests_the_primary_set_and_lists_the_others(tmp_path):
    """configs/sft.yaml, grpo.yaml and eval.yaml (a LoRA SFT, unlike the demo's full one) on PathMMU-format
    fixture splits, the tiny model: ~45 s on 2 CPU cores."""
    from data.pathmmu import prepare
    from test_data_real import build_mmu_files

    (tmp_path / "raw").mkdir()
    files = build_mmu_files(tmp_path / "raw")
    data = tmp_path / "pathmmu"  # sft 26, rl 8, test 6 items
    prepare.main(["--data-json", files["data_json"], "--images", files["zip"], "--out", str(data)])
    on_cpu = {"quantization": "none", "max_pixels": 56 * 56}  # the configs' 4-bit 7B, on the tiny model
    train = {**on_cpu, "gradient_checkpointing": False, "optimizer": "adamw", "lora_r": 8, "lora_alpha": 16,
             "save_every": 0}
    spec = {
        "sft": "configs/sft.yaml", "grpo": "configs/grpo.yaml", "eval": "configs/eval.yaml", "primary_set": "pathmmu",
        "defaults": {
            "sft": {**train, "model": "tiny", "data": f"{data}/sft.jsonl", "eval_data": None, "max_steps": 2,
                    "batch_size": 4, "grad_accum": 1, "warmup_steps": 0},
            "grpo": {**train, "data": f"{data}/rl.jsonl", "max_steps": 1, "num_prompts": 2, "group_size": 2,
                     "max_new_tokens": 8},
            # the primary set second: the table must pick it by name, not take the first
            "eval": {**on_cpu, "sets": [f"rl_items={data}/rl.jsonl", f"pathmmu={data}/test.jsonl"], "limit": 4,
                     "max_new_tokens": 8}},
        "variants": {"β baseline": {}, "kl_coef=0": {"kl_coef": 0, "reference": "none"},
                     "γ more SFT": {"stage": "sft", "data": f"{data}/rl.jsonl", "max_steps": 1}}}
    path, out = tmp_path / "ablate.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "tools/ablate.py", str(path), "--seeds", "0", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    launched = [line for line in done.stdout.splitlines() if line.startswith("$ python")]
    assert [line.split()[2:4] for line in launched] == [
        ["train_sft.py", "configs/sft.yaml"], ["train_grpo.py", "configs/grpo.yaml"], ["eval.py", "configs/eval.yaml"],
        ["train_grpo.py", "configs/grpo.yaml"], ["eval.py", "configs/eval.yaml"],
        ["train_sft.py", "configs/sft.yaml"], ["eval.py", "configs/eval.yaml"]]  # α once, shared by all three
    sft_dir = out / "_sft" / "seed0"
    assert f"model=tiny init_adapter={sft_dir} " in launched[1]  # β: α's adapter trained further, on the base
    assert f"init_adapter={sft_dir} " in launched[5]  # γ: α's adapter, more SFT
    assert f"model=tiny adapter={out / 'more_SFT' / 'seed0' / 'train'} " in launched[6]  # an adapter on the base

    table = done.stdout[done.stdout.index("| variant"):].splitlines()
    header = table[0].split(" | ")
    assert header[-5:] == ["shuffled image %", "rl_items %", "CPU min", "difference vs baseline (95% CI)",
                           "p (Holm) |"] and "pathmmu %" not in table[0]
    assert [row.split(" | ")[0].lstrip("| ") for row in table[2:5]] == ["β baseline", "kl_coef=0", "γ more SFT"]
    for row in table[2:5]:
        cells = row.split(" | ")
        assert len(cells) == len(header)
        metrics = json.loads((out / slug(cells[0].lstrip("| ")) / "seed0" / "eval" / "metrics.json").read_text())
        assert cells[1] == f"{100 * metrics['sets']['pathmmu']['accuracy']:.1f} ± 0.0"
        assert cells[-4] == f"{100 * metrics['sets']['rl_items']['accuracy']:.1f}"
    markdown = (out / "ablation.md").read_text()
    assert "accuracy and its test on the pathmmu set (closed 4); rl_items %: mean accuracy on that set" in markdown.splitlines()[0]
    assert (out / "ablation.png").stat().st_size > 0


def write_eval(eval_dir, sets: dict[str, list[bool]]):
    """An evaluation as eval.py leaves it: metrics.json per set and predictions.jsonl, each line with its set."""
    eval_dir.mkdir(parents=True)
    metrics = {name: {"accuracy": sum(right) / len(right), "format_rate": 1.0, "mean_completion_tokens": 30.0}
               for name, right in sets.items()}
    (eval_dir / "metrics.json").write_text(json.dumps({"sets": metrics}))
    (eval_dir / "predictions.jsonl").write_text("".join(
        json.dumps({"id": f"item{i}", "set": name, "correct": right}) + "\n"
        for name, answers in sets.items() for i, right in enumerate(answers)))
    (eval_dir.parent / "cpu_minutes.json").write_text(json.dumps({"cpu_minutes": 1.0}))


def test_the_table_tests_the_primary_set_only(tmp_path, monkeypatch):
    """Items of another set with the same ids must not enter the primary set's test; its accuracy is a column."""
    monkeypatch.chdir(ROOT)
    path = tmp_path / "ablate.yaml"
    sets = ["ood=ood.jsonl", "main=main.jsonl"]
    path.write_text(yaml.safe_dump({"primary_set": "main", "defaults": {"eval": {"sets": sets}},
                                    "variants": {"baseline": {}, "kl_coef=0": {"kl_coef": 0, "reference": "none"}}}))
    ab = read_ablation(str(path))
    assert (ab.sets, ab.primary, ab.configs["grpo"]) == (["ood", "main"], "main", "configs/demo_grpo.yaml")
    write_eval(tmp_path / "baseline" / "seed0" / "eval", {"ood": [True] * 4, "main": [True, False, False, False]})
    write_eval(tmp_path / "kl_coef=0" / "seed0" / "eval", {"ood": [False] * 4, "main": [True, True, True, False]})
    results = {name: [run_variant(name, {}, 0, str(tmp_path), ab)] for name in ab.variants}  # nothing runs
    assert results["baseline"][0]["correct"] == {(0, "item0"): True, (0, "item1"): False, (0, "item2"): False,
                                                 (0, "item3"): False}
    rows = table(results, [0]).splitlines()
    assert rows[0].endswith("| shuffled image % | ood % | CPU min | difference vs baseline (95% CI) | p (Holm) |")
    assert rows[2].startswith("| baseline | 25.0 ± 0.0 |") and "| 100.0 | 1.0 | - | - |" in rows[2]
    assert rows[3].startswith("| kl_coef=0 | 75.0 ± 0.0 |")
    assert rows[3].endswith("| 0.0 | 1.0 | +50.0 (1 seed: no interval) | – |")


@pytest.mark.parametrize("spec, message", [
    ({"primary_sett": "demo"}, "unknown key 'primary_sett' (did you mean 'primary_set'?)"),
    ({"defaults": {"evall": {}}}, "defaults: unknown script 'evall' (did you mean 'eval'?)"),
    ({"defaults": {"grpo": {"model": "tiny"}}},
     "'model' is set by tools/ablate.py for each run (the base model is the SFT"),
    ({"defaults": {"sft": {"max_step": 2}}}, "unknown config key 'max_step' (did you mean 'max_steps'?)"),
    ({"primary_set": "dem"}, "no set 'dem' in configs/demo_eval.yaml's sets (demo) (did you mean 'demo'?)"),
    ({"grpo": "configs/grpo.yml"}, "grpo: 'configs/grpo.yml' is not a config file"),
    ({"variants": {"b": {"stage": "stf"}}}, "variant 'b': stage: 'stf' is not one of grpo | sft (did you mean 'sft'?)"),
    # the last variant's misspelt key stops the ablation before the first variant trains
    ({"variants": {"b": {}, "c": {"kl_coeff": 0}}},
     "variant 'c', train_grpo.py: command line: unknown config key 'kl_coeff' (did you mean 'kl_coef'?)"),
    ({"variants": {"β": {}}}, "variant 'β' has no letter A-Z or digit to name its folder"),
])
def test_ablation_yaml_mistakes_stop_it_named(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "ablate.yaml"
    path.write_text(yaml.safe_dump({"variants": {"baseline": {}}, **spec}, allow_unicode=True, sort_keys=False))
    with pytest.raises(SystemExit) as stopped:
        main([str(path), "--out", str(tmp_path / "out")])
    assert message in str(stopped.value.code)
    assert not (tmp_path / "out").exists()


def write_spec(tmp_path, data: str, **variants) -> str:
    """An ablation whose every run reads `data` (the tiny model, a step or two), plus these variants."""
    spec = {"defaults": {"sft": {"model": "tiny", "data": data, "eval_data": None, "max_steps": 1},
                         "grpo": {"data": data, "eval_data": None, "max_steps": 1},
                         "eval": {"sets": [f"demo={data}"]}},
            "variants": {"baseline": {}, **variants}}
    path = tmp_path / "ablate.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("seeds, message", [
    (["0", "0"], r"^error: --seeds: 0 given twice: each seed is one trained model"),
    (["0", "1", "-1"], r"^error: --seeds: key 'seed' must be an int between 0 and 2147483647, got -1"),
    (["0", "2147483648"], r"^error: --seeds: key 'seed' must be an int between 0 and 2147483647, got 2147483648"),
])
def test_repeated_or_out_of_range_seeds_stop_before_any_run(tmp_path, seeds, message):
    """Before, `--seeds 0 0` averaged one model twice and `--seeds -1` failed in the first script it reached."""
    data = tmp_path / "split.jsonl"
    data.write_text("")  # never read: the seeds are refused first
    path = write_spec(tmp_path, str(data))
    done = subprocess.run([sys.executable, "tools/ablate.py", path, "--seeds", *seeds, "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "$ python" not in done.stdout, done.stdout + done.stderr
    assert re.search(message, done.stderr.strip().splitlines()[-1]), done.stderr
    assert not (tmp_path / "out").exists()


def test_every_missing_file_of_every_variant_is_named_before_any_run(tmp_path, monkeypatch):
    """Each variant's data, eval sets and starting adapter, for each seed it runs, looked for before the first run
    (before, only the configs were resolved, with seed 0): one message names every missing file, its variant and
    key. What an earlier run makes (the SFT model), and a variant already evaluated, are not looked for."""
    monkeypatch.chdir(ROOT)
    data = tmp_path / "split.jsonl"
    data.write_text("")
    path = write_spec(tmp_path, str(tmp_path / "sft_missing.jsonl"),
                      **{"other data": {"data": str(tmp_path / "rl_missing.jsonl")},
                         "γ from an adapter": {"stage": "sft", "start": "base", "data": str(data), "finetune": "lora",
                                               "init_adapter": str(tmp_path / "no_adapter")},
                         "done": {"data": str(tmp_path / "gone.jsonl")}})
    write_eval(tmp_path / "out" / "done" / "seed1" / "eval", {"demo": [True]})
    write_eval(tmp_path / "out" / "done" / "seed2" / "eval", {"demo": [True]})
    with pytest.raises(SystemExit) as stopped:
        main([path, "--seeds", "1", "2", "--out", str(tmp_path / "out")])
    message = str(stopped.value.code)
    assert message.startswith(f"error: {path}: files not found, before any run: ")
    for named in [f"train_sft.py data: {tmp_path}/sft_missing.jsonl (the shared SFT)",
                  f"train_grpo.py data: {tmp_path}/sft_missing.jsonl ('baseline')",
                  f"eval.py sets: {tmp_path}/sft_missing.jsonl ('baseline', 'other data', 'γ from an adapter')",
                  f"train_grpo.py data: {tmp_path}/rl_missing.jsonl ('other data')",
                  f"train_sft.py init_adapter: {tmp_path}/no_adapter ('γ from an adapter')"]:
        assert named in message
    assert message.count("; ") == 4, message
    assert "gone.jsonl" not in message and "/_sft/" not in message  # evaluated already; made by the SFT
    assert sorted(os.listdir(tmp_path / "out")) == ["done"]


def test_a_failed_stage_points_at_its_message_not_at_running_again(tmp_path):
    """A split the SFT refuses (a record without its answer) passes the ablation's own checks and fails in
    train_sft.py the same way every time: the ablation says to act on the script's message, not (as it did) to
    run the same command again."""
    data = tmp_path / "split.jsonl"
    data.write_text(json.dumps({"id": "r1", "image": "r1.png", "question": "Stain?", "options": ["a", "b"]}) + "\n")
    path = write_spec(tmp_path, str(data))
    done = subprocess.run([sys.executable, "tools/ablate.py", path, "--seeds", "0", "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "error: key 'data'" in done.stderr, done.stderr
    assert last.startswith("error: `python train_sft.py ") and "failed (exit 1): its message above says" in last
    assert "run the same command again" not in last, last


def test_example_ablations_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the YAML's config paths are the repository's
    for path in ("configs/ablations/demo.yaml", "configs/ablations/pathmmu.yaml"):
        ab = read_ablation(path)
        check_variants(ab, str(tmp_path))  # every run's config, as its script will read it
    assert (ab.primary, ab.base_model, ab.sft_full) == ("pathmmu", "Qwen/Qwen2.5-VL-7B-Instruct", False)


# ----------------------------------------------------------------------------------------------
# The statistics (stats.py), checked by hand and on simulated ablations where the truth is known

import math  # noqa: E402

import numpy as np  # noqa: E402

from tools.stats import (estimate_spreads, holm, mcnemar, power_report, rejection_rate, seed_item_p,  # noqa: E402
                         seed_item_test, seeds_needed, simulate, t_quantile, t_two_sided_p)


def test_t_distribution_matches_printed_tables():
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| > 1) = 1/2
    assert t_two_sided_p(2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6))  # df 2: 1 - t/sqrt(t² + 2)
    assert t_two_sided_p(0.0, 5) == 1.0 and t_two_sided_p(math.inf, 3) == 0.0
    for df, printed in [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)]:
        assert t_quantile(0.975, df) == pytest.approx(printed, abs=5e-4)


def test_seed_item_test_worked_by_hand():
    # the baseline gets 4 items wrong in 3 seeds; the variant gets 2, 1, 0 of them right
    base = np.zeros((3, 4), dtype=bool)
    variant = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    # d_s = .5 .25 0 -> var .0625/3 = .020833; item means 2/3 1/3 0 0 -> var .101852/4 = .025463;
    # cells: 3 ones in 12 -> var .204545/12 = .017045; SE² = .020833 + (.025463 - .017045) = .029251
    d = seed_item_test(base, variant)
    assert d.diff == pytest.approx(25.0) and (d.seeds, d.items) == (3, 4)
    se = 100 * math.sqrt(0.0625 / 3 + 0.30556 / 3 / 4 - 2.25 / 11 / 12)
    assert se == pytest.approx(17.10, abs=0.01)
    assert d.p == pytest.approx(1 - (25 / se) / math.sqrt((25 / se) ** 2 + 2), abs=1e-4)  # t = 1.46, df 2: p = .28
    assert (d.low, d.high) == pytest.approx((25 - 4.3027 * se, 25 + 4.3027 * se), abs=0.01)
    one_seed = seed_item_test(base[:1], variant[:1])  # training randomness unmeasured: no interval, no p
    assert one_seed.diff == 50.0 and math.isnan(one_seed.p) and math.isnan(one_seed.low)
    # no variation seen (every seed the same difference) is no certainty: no p, said in the note
    same = seed_item_test(base, base)
    assert math.isnan(same.p) and "no variation seen" in same.note
    every = np.ones((3, 4), dtype=bool)  # +100 points on every item of every seed: no spread to test against
    assert math.isnan(seed_item_test(base, every).p)  # the old code gave p = 0 here
    missing = variant.astype(float)
    missing[0, 0] = math.nan  # a run without an answer for an item
    assert math.isnan(seed_item_test(base, missing).p) and "not tested" in seed_item_test(base, missing).note
    assert "1 degree of freedom" in seed_item_test(base[:2], variant[:2]).note


def test_equal_differences_over_2_seeds_are_no_false_positives():
    """Null ablations with 2 seeds: where both seeds' differences are equal (standard error 0) the old test
    said p = 0, most of its false positives at 2 seeds; now those are untested, and the rate stays at 5%."""
    rng = np.random.default_rng(3)
    null = [simulate(rng, seeds=2, items=20, diff=0.0, seed_sd=0.0, item_sd=0.0, sft_item_sd=0.0)
            for _ in range(400)]
    tests = [seed_item_test(*pair) for pair in null]
    zero_se = [t for t in tests if "no variation seen" in t.note]
    assert zero_se and all(math.isnan(t.p) for t in zero_se)
    assert np.mean([t.p < 0.05 for t in tests]) <= 0.07


def test_holm_steps_down_and_skips_untested():
    adjusted = holm([0.01, 0.04, 0.03, math.nan])  # sorted .01 .03 .04, times 3 2 1, made non-decreasing
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def pooled_mcnemar(base, variant):  # what tools/ablate.py did: every (seed, item) pair as an independent one
    return mcnemar(base.ravel().tolist(), variant.ravel().tolist()).p_exact


def paired_t_over_seeds(base, variant):  # seed_item_test without its item term
    d = variant.mean(1) - base.mean(1)
    return t_two_sided_p(d.mean() / (d.std(ddof=1) / math.sqrt(len(d))), len(d) - 1)


def test_false_positives_and_power_on_simulated_ablations():
    """stats.simulate as docs/ablations.md's run: seed sd 4 points, 80% of it shared through the SFT model, 300 items.
    300 simulated ablations per figure: a true 5% reads below 8.5% (3 sd of 1.3%)."""
    demo = {"items": 300, "seed_sd": 4}
    for seeds in (3, 10):
        assert rejection_rate(seed_item_p, 300, seed=seeds, seeds=seeds, diff=0, **demo) <= 0.085
        assert rejection_rate(pooled_mcnemar, 300, seed=seeds, seeds=seeds, diff=0, **demo) >= 0.10  # ~17%
    assert rejection_rate(seed_item_p, 300, seed=1, seeds=3, diff=3, **demo) <= 0.3  # ~16%: 3 seeds can't see 3 points
    assert 0.55 <= rejection_rate(seed_item_p, 300, seed=2, seeds=10, diff=3, **demo) <= 0.9  # ~74%
    assert rejection_rate(seed_item_p, 300, seed=3, seeds=10, diff=6, **demo) >= 0.9  # ~100%
    # items one variant is better at in every seed: the seeds' spread misses them, the item term does not
    items_matter = {"items": 300, "seed_sd": 1, "variant_item_sd": 1.5, "seeds": 10, "diff": 0}
    assert rejection_rate(seed_item_p, 300, seed=4, **items_matter) <= 0.085
    assert rejection_rate(paired_t_over_seeds, 300, seed=4, **items_matter) >= 0.13  # ~21%


def test_seeds_needed_grows_as_the_difference_shrinks():
    big, tried = seeds_needed(8, 4, 300, sims=100, max_seeds=10)
    assert big is not None and tried[-1] == (big, tried[-1][1]) and tried[-1][1] >= 0.8
    assert seeds_needed(3, 4, 300, sims=100, max_seeds=big)[0] is None  # 3 points need more than 8 points do
    printed = power_report(8, {"seed_sd": 4, "items": 300}, {}, "", sims=100, max_seeds=10)
    assert "seed sd (points): 4 (given)" in printed and "item spread (logit sd): 3 (default)" in printed
    assert printed.endswith(f"{big} seeds per variant give 80% power")


GRID = tuple(np.arange(0.0, 4.01, 0.5))


@pytest.mark.parametrize("item_sd, sft_item_sd", [(1.0, 3.0), (3.0, 0.5)])
def test_item_spreads_are_estimated_from_runs_where_the_truth_is_known(item_sd, sft_item_sd):
    """Two simulated ablations the default spreads (3, 3) would misdescribe, each way round: the estimate finds
    each within one grid step or so, and the seed-level settings near their truth (rough from 5 seeds)."""
    rng = np.random.default_rng(7)
    base, variant = simulate(rng, 5, 300, 0.0, 4.0, 0.8, item_sd=item_sd, sft_item_sd=sft_item_sd)
    got = estimate_spreads(np.stack([base, variant]), sims=10, grid=GRID)
    assert abs(got["item_sd"] - item_sd) <= 0.75 and abs(got["sft_item_sd"] - sft_item_sd) <= 0.75, got
    assert 1.5 <= got["seed_sd"] <= 8 and got["seeds"] == 5 and got["items"] == 300
    with pytest.raises(ValueError, match="3 or more seeds"):
        estimate_spreads(np.stack([base[:2], variant[:2]]))


def test_power_estimates_what_is_not_given_from_the_runs_in_out(tmp_path, monkeypatch, capsys):
    """`ablate.py <variants> --power` reads the baseline's and the variants' predictions in --out, estimates the
    spreads not given, and says which values are given, estimated or default; without the runs, one message."""
    monkeypatch.chdir(ROOT)
    ab = read_ablation("configs/ablations/demo.yaml")
    names = list(ab.variants)[:2]
    rng = np.random.default_rng(3)
    base, variant = simulate(rng, 3, 200, 0.0, 4.0, 0.8, item_sd=1.0, sft_item_sd=3.0)
    args = ["configs/ablations/demo.yaml", "--power", "--out", str(tmp_path), "--diff", "15", "--sims", "20",
            "--max-seeds", "4", "--seed-sd", "5"]
    with pytest.raises(SystemExit, match="needs the baseline and a variant evaluated for 3 or more seeds"):
        main(args)
    for name, right in zip(names, (base, variant)):
        for seed in range(3):
            write_eval(tmp_path / slug(name) / f"seed{seed}" / "eval", {"demo": list(map(bool, right[seed]))})
    main(args)
    printed = capsys.readouterr().out
    assert "seed sd (points): 5 (given)" in printed and "items: 200 (estimated)" in printed
    assert "seed-by-item spread (logit sd): " in printed and "(default)" not in printed
    assert f"estimated from 2 variants x 3 seeds in {tmp_path}: rough from 3 seeds" in printed
    with pytest.raises(SystemExit, match="3 or more seeds"):
        main(args + ["--seeds", "0", "1"])


def fake_run(seed: int, answers: list[int]) -> dict:
    return {"accuracy": 100 * sum(answers) / len(answers), "format_rate": 1.0, "length": 35.0, "cpu_minutes": 2.0,
            "correct": {(seed, f"item{i}"): bool(a) for i, a in enumerate(answers)},
            "image_right": None, "agrees": None, "blank": None, "shuffled": None}


def test_a_set_of_open_questions_gets_its_f1_column(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "ablate.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"eval": {"sets": ["open=open.jsonl"]}},
                                    "variants": {"baseline": {}, "f1": {"open_answer_reward": "f1"}}}))
    ab = read_ablation(str(path))
    for name, right, f1 in [("baseline", [True, False], 0.6), ("f1", [True, True], 0.9)]:
        write_eval(tmp_path / name / "seed0" / "eval", {"open": right})
        metrics = json.loads((tmp_path / name / "seed0" / "eval" / "metrics.json").read_text())
        metrics["sets"]["open"].update(kinds={"open": 2}, open_f1=f1)  # as evaluation.kind_metrics writes them
        (tmp_path / name / "seed0" / "eval" / "metrics.json").write_text(json.dumps(metrics))
    results = {name: [run_variant(name, variant, 0, str(tmp_path), ab)] for name, variant in ab.variants.items()}
    assert results["f1"][0]["kinds"] == {"open": 2}
    rows = table(results, [0]).splitlines()
    assert "| tokens | open F1 % | image stated right % |" in rows[0]
    assert rows[1].count("|---") == rows[0].count(" | ") + 1
    assert "| 30.0 | 60.0 |" in rows[2] and "| 30.0 | 90.0 |" in rows[3]


def test_table_gives_difference_interval_and_holm_p():
    rng = np.random.default_rng(0)
    baseline = [rng.random(60) < 0.6 for _ in range(3)]
    results = {"baseline": [fake_run(s, a) for s, a in enumerate(baseline)],
               "same": [fake_run(s, a) for s, a in enumerate(baseline)],
               "worse": [fake_run(s, a & (rng.random(60) < 0.5)) for s, a in enumerate(baseline)]}
    rows = table(results, [0, 1, 2]).splitlines()
    assert rows[0].endswith("| CPU min | difference vs baseline (95% CI) | p (Holm) |")
    assert rows[1].count("|---") == rows[0].count(" | ") + 1
    # an identical variant shows no variation at all: untested, said so, and not counted by Holm
    assert rows[2].endswith("| - | - |")
    assert rows[3].endswith("| +0.0 (not tested: no variation seen over 3 seeds (standard error 0)) | – |")
    worse = seed_item_test(*(np.array([list(r["correct"].values()) for r in results[name]])
                             for name in ("baseline", "worse")))
    holm_p = worse.p  # one variant tested ("same" is not): Holm leaves its p as it is
    assert rows[4].endswith(f"| {worse.diff:+.1f} ({worse.low:+.1f} to {worse.high:+.1f}) | {holm_p:.2g} |")
    one_seed = table({name: runs[:1] for name, runs in results.items()}, [0]).splitlines()
    assert one_seed[4].endswith("(1 seed: no interval) | – |")
