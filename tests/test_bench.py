"""The GPU benchmark runs end to end on CPU with `--arch tiny`: the random-weight model is built,
saved and loaded 4-bit through model.load_model, train_grpo.main runs two real steps, and every
figure is printed. (TRL is a benchmark-only dependency: nothing TRL-based runs here.)"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def figure(output: str, label: str) -> float:
    """The number after `label` on its line of the printed table."""
    match = re.search(rf"^{re.escape(label)}\s+([0-9.eE+-]+)\s*$", output, re.MULTILINE)
    assert match, f"no figure for {label!r} in:\n{output}"
    return float(match.group(1))


def test_gpu_grpo_tiny_prints_the_figures(tmp_path):
    # PATHVLM_CACHE (tests/conftest.py) keeps the random weights out of the user's cache
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_grpo.py"), "--arch", "tiny",
                             "--steps", "2", "--workdir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
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
