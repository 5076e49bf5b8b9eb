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


def figures_of(output: str, label: str) -> list[float]:
    """Every number after `label` on its line of the printed table (one per run)."""
    match = re.search(rf"^{re.escape(label)}((?:\s+[0-9.eE+-]+)+)\s*$", output, re.MULTILINE)
    assert match, f"no figures for {label!r} in:\n{output}"
    return [float(x) for x in match.group(1).split()]


def test_gpu_grpo_tiny_prints_and_saves_the_figures(tmp_path):
    # PATHVLM_CACHE (tests/conftest.py) keeps the random weights out of the user's cache
    saved = tmp_path / "tiny.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_grpo.py"), "--arch", "tiny",
                             "--steps", "2", "--runs", "hf", "static", "graph", "sft", "--sft-steps", "3",
                             "--workdir", str(tmp_path), "--json", str(saved)],
                            cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    step = figures_of(out, "s/step (median)")
    phases = [figures_of(out, "  generation"), figures_of(out, "  log-prob (reference, no grad)"),
              figures_of(out, "  backward (policy fwd+bwd, optimizer)")]
    assert all(s > 0 for s in step) and all(p > 0 for phase in phases for p in phase)
    assert all(sum(p[i] for p in phases) <= step[i] * 1.001 for i in range(3))  # the three phases split the step
    assert all(t > 0 for t in figures_of(out, "generation s/token") + figures_of(out, "generation tokens/s"))
    assert figures_of(out, "completion tokens (mean)") == [16] * 3  # EOS ignored: every completion is full length
    assert all(m > 0 for m in figures_of(out, "peak memory, process RSS (GiB)"))
    assert re.search(r"^SFT, 3 steps .* = [0-9.]+$", out, re.MULTILINE)
    assert out.count("cuda_graph: the decode step could not be recorded") == 2  # graph on a CPU: one line a step

    # the saved figures are the printed ones, and --table turns them into bench/README.md rows
    figures = json.loads(saved.read_text())
    assert list(figures["runs"]) == ["hf", "static", "graph", "sft"] and len(figures["runs"]["static"]["steps"]) == 2
    assert {"torch", "transformers", "peft", "bitsandbytes", "cuda"} <= set(figures["versions"])
    assert f"{figures['runs']['static']['steps'][1]['step_s']:.4g}" in out
    table = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_grpo.py"), "--table", str(saved)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr[-3000:]
    rows = [line for line in table.stdout.splitlines() if line.startswith("| 20")]
    assert [row.split(" | ")[3] for row in rows] == ["hf", "static", "graph", "sft"]
    measured = sorted(s["step_s"] for s in figures["runs"]["hf"]["steps"][1:])  # warm-up step left out
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
                             "--arch", "tiny", "--steps", "2", "--runs", "static", "--workdir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert figure(result.stdout, "completion tokens (mean)") == 16
    assert hub_model in result.stdout
