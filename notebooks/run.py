"""Run a notebook top to bottom and save it with its outputs: what `make notebook` and the notebook test do.

    python notebooks/run.py notebooks/grpo_walkthrough.ipynb                   # outputs written in place
    python notebooks/run.py notebooks/grpo_walkthrough.ipynb --out /tmp/nb.ipynb SFT_STEPS=30 GRPO_STEPS=2

`NAME=value` arguments replace the values of the cell tagged "parameters", as papermill does: a cell
that sets them is put right after it (value: a Python literal, else a string). The kernel starts in the
repository root, so the notebook's relative paths are the scripts'. A cell that raises stops the run
with the cell's error; the notebook is then written with the outputs so far, to read what failed.
"""

import argparse
import ast
import json
import os
import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parameter_cell(assignments: list[str]) -> nbformat.NotebookNode:
    lines = []
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            sys.exit(f"parameters are NAME=value, got '{item}'")
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            value = repr(value)  # not a Python literal: a string
        lines.append(f"{name} = {value}")
    cell = nbformat.v4.new_code_cell("# parameters given to notebooks/run.py\n" + "\n".join(lines))
    cell.metadata["tags"] = ["injected-parameters"]
    return cell


def this_python_kernel(folder: str) -> str:
    """A kernel spec for the Python running this script (the project's venv), so that a "python3"
    kernel registered elsewhere on the machine (conda, another venv) cannot run the notebook instead."""
    spec_dir = os.path.join(folder, "kernels", "pathvlm-this-python")
    os.makedirs(spec_dir)
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   "display_name": "Python 3", "language": "python"}, f)
    os.environ["JUPYTER_PATH"] = os.pathsep.join([folder, os.environ.get("JUPYTER_PATH", "")]).rstrip(os.pathsep)
    return "pathvlm-this-python"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("notebook")
    p.add_argument("--out", help="where to write the executed notebook (default: in place)")
    p.add_argument("--timeout", type=int, default=900, help="seconds any one cell may take")
    p.add_argument("parameters", nargs="*", help="NAME=value replacing the parameters cell's values")
    args = p.parse_intermixed_args(argv)

    nb = nbformat.read(args.notebook, as_version=4)
    if args.parameters:
        tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
        if not tagged:
            sys.exit(f"{args.notebook} has no cell tagged 'parameters' to override")
        nb.cells.insert(tagged[0] + 1, parameter_cell(args.parameters))
    start = time.time()
    failed = None
    with tempfile.TemporaryDirectory() as folder:
        client = NotebookClient(nb, timeout=args.timeout, kernel_name=this_python_kernel(folder),
                                resources={"metadata": {"path": ROOT}})
        try:
            client.execute()
        except CellExecutionError as e:
            failed = e
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    out = args.out or args.notebook
    nbformat.write(nb, out)
    minutes = (time.time() - start) / 60
    if failed is not None:
        sys.exit(f"{args.notebook}: a cell failed after {minutes:.1f} min (outputs so far in {out}):\n{failed}")
    print(f"ran {args.notebook} in {minutes:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
