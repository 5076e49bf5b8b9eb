"""ablate.py on the tiny model: variants x seeds run the real scripts, share the SFT model, skip what is
finished, and the table holds every column it promises."""

import os
import subprocess
import sys

import yaml

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
    command = [sys.executable, "ablate.py", str(path), "--seeds", "0", "--out", str(out)]
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    launched = [line for line in first.stdout.splitlines() if line.startswith("$ python")]
    sft_output = f"output_dir={out / '_sft' / 'seed0'}"
    assert sum(line.endswith(sft_output) for line in launched) == 1  # the shared SFT model, trained once
    assert sum("eval.py" in line for line in launched) == 3
    table = first.stdout[first.stdout.index("| variant"):].splitlines()
    assert [row.split(" | ")[0].lstrip("| ") for row in table[2:5]] == ["baseline", "kl_coef=0", "γ more SFT"]
    assert table[2].endswith("| - |") and ", p = " in table[3]  # McNemar against the baseline
    assert (out / "ablation.md").is_file() and (out / "ablation.png").stat().st_size > 0
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "$ python" not in again.stdout  # everything was done: nothing runs
    assert again.stdout[again.stdout.index("| variant"):] == first.stdout[first.stdout.index("| variant"):]
