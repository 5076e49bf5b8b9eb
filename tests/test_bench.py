"""The GPU benchmark runs end to end on CPU with `--arch tiny`: the random-weight model is built,
saved and loaded 4-bit through model.load_model, train_grpo.main runs two real steps, and every
figure is printed. (TRL is a benchmark-only dependency: nothing TRL-based runs here.)"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def figure(output: str, label: str) -> float:
    """The number after `label` on its line of the printed table."""
    match = re.search(rf"^{re.escape(label)}\s+([0-9.eE+-]+)\s*$", output, re.MULTILINE)
    assert match, f"no figure for {label!r} in:\n{output}"
    return float(match.group(1))


def test_gpu_grpo_tiny_prints_and_saves_the_figures(tmp_path):
    # PATHVLM_CACHE (tests/conftest.py) keeps the random weights out of the user's cache
    saved = tmp_path / "tiny.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_grpo.py"), "--arch", "tiny",
                             "--steps", "2", "--runs", "ours", "sft", "--workdir", str(tmp_path), "--json", str(saved)],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    step = figure(out, "s/step (median)")
    phases = [figure(out, "  generation"), figure(out, "  log-prob (reference, no grad)"),
              figure(out, "  backward (policy fwd+bwd, optimizer)")]
    assert step > 0 and all(p > 0 for p in phases)
    assert sum(phases) <= step * 1.001  # the three phases split the step
    assert figure(out, "generation tokens/s") > 0
    assert figure(out, "completion tokens (mean)") == 16  # EOS ignored: every completion is full length
    assert figure(out, "peak memory, process RSS (GiB)") > 0
    assert re.search(r"^SFT step .* = [0-9.]+$", out, re.MULTILINE)

    # the saved figures are the printed ones, and --table turns them into bench/README.md rows
    figures = json.loads(saved.read_text())
    assert set(figures["runs"]) == {"ours", "sft"} and len(figures["runs"]["ours"]["steps"]) == 2
    assert f"{figures['runs']['ours']['steps'][1]['step_s']:.4g}" in out
    table = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_grpo.py"), "--table", str(saved)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr[-3000:]
    rows = [line for line in table.stdout.splitlines() if line.startswith("| 20")]
    assert [row.split(" | ")[3] for row in rows] == ["ours", "sft"]
    measured = sorted(s["step_s"] for s in figures["runs"]["ours"]["steps"][1:])  # warm-up step left out
    assert f"| {measured[0]:.1f} |" in rows[0] and "--arch tiny" in rows[0]


@pytest.mark.parametrize("arch, parameters", [
    # parameters of the released Qwen2.5-VL-7B-Instruct (16,584,333,312 bytes of bf16) and 3B-Instruct
    ("7b", 8_292_166_656), ("3b", 3_754_622_976)])
def test_bench_architectures_have_the_real_parameter_counts(arch, parameters):
    """The random 7B / 3B models are the published architectures: built on the meta device (no
    memory), they have exactly the released checkpoints' parameter counts."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from gpu_grpo import arch_config
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pathvlm.tiny import build_tiny_tokenizer

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(arch_config(arch, build_tiny_tokenizer()))
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_gpu_grpo_loads_a_checkpoint_by_hub_id(hub_model, tmp_path):
    """`--model Qwen/Qwen2.5-VL-7B-Instruct` on a GPU is this, by the tiny real-shaped checkpoint's id
    (offline hub cache, the real generation_config.json): loaded, run, every completion full length."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_grpo.py"), "--model", hub_model,
                             "--arch", "tiny", "--steps", "2", "--runs", "ours", "--workdir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert figure(result.stdout, "completion tokens (mean)") == 16
    assert hub_model in result.stdout
