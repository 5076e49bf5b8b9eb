"""The classroom notebook: it runs top to bottom on the real tiny model (fewer steps than `make notebook`),
and the committed copy carries outputs made with the parameters the configs hold."""

import json
import os
import subprocess
import sys

import nbformat
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "grpo_walkthrough.ipynb")


def outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", "") if out["output_type"] == "stream" else json.dumps(out.get("data", {})))
    return "".join(parts)


def test_notebook_runs_on_the_tiny_model(demo_data, tmp_path):
    out = tmp_path / "executed.ipynb"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "notebooks", "run.py"), NOTEBOOK, "--out", str(out),
         "SFT_STEPS=12", "GRPO_STEPS=2", "TEST_ITEMS=8", f"DATA={demo_data}", f"RUN_DIR={tmp_path / 'runs'}",
         "REUSE_DEMO=False"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    nb = nbformat.read(out, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(o["output_type"] != "error" for c in code for o in c.outputs)
    assert all(c.execution_count is not None for c in code)  # every cell ran
    text = "\n".join(outputs_text(c) for c in code)
    assert "same: True" in text  # group_advantages equals the advantages computed by hand
    assert "$ python train_sft.py configs/demo_sft.yaml max_steps=12" in text  # trained, not reused
    assert "McNemar:" in text and "SFT + GRPO" in text
    # what the runs wrote where the parameters said, and nowhere in the repository
    runs = tmp_path / "runs"
    assert (runs / "grpo" / "adapter_model.safetensors").is_file()
    assert [json.loads(line)["step"] for line in open(runs / "grpo" / "metrics.jsonl")] == [1, 2]
    assert sum(1 for _ in open(runs / "eval_grpo" / "predictions.jsonl")) == 8
    assert (runs / "eval_sft" / "confusion.png").is_file() and (runs / "eval_grpo" / "confusion.png").is_file()


def test_committed_notebook_has_outputs_of_the_configs_settings():
    """`make notebook` regenerates the outputs; this catches a notebook committed without running it,
    or run with settings other than the demo's."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "run `make notebook`, commit it with its outputs"
    assert sum(bool(c.outputs) for c in code) >= len(code) - 2  # the parameters and import cells print nothing
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    params = {}
    exec(next(c.source for c in code if "parameters" in c.metadata.get("tags", [])), params)
    for config, key, name in [("demo_sft.yaml", "max_steps", "SFT_STEPS"),
                              ("demo_grpo.yaml", "max_steps", "GRPO_STEPS")]:
        with open(os.path.join(ROOT, "configs", config)) as f:
            assert params[name] == yaml.safe_load(f)[key], f"{name} differs from configs/{config}'s {key}"
    text = "\n".join(outputs_text(c) for c in code)
    # no path of the machine that ran it (a library warning, a traceback)
    assert ROOT not in text and ".venv/lib" not in text and "site-packages" not in text
