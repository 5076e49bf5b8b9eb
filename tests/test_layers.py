"""The layers of pathvlm/__init__.py hold in the code: every import of every module (function-level ones
too) goes to its own layer or a lower one, never round a circle; the top level imports the package and
rewards.py, and no script or tool imports another (bench/, which measures the scripts, may call them).
The checker is run on made-up graphs first, so a broken checker cannot pass a broken tree."""

import ast
import os
import re

import pytest

import pathvlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train_sft", "train_grpo", "eval"}
# what only the tools use; each other file in tools/ is a tool
TOOL_SUPPORT = {"tools.paper", "tools.plots", "tools.stages", "tools.stats"}


def layer_table() -> dict[str, int]:
    """pathvlm/__init__.py's table -> {"pathvlm.grpo": 1, ...}: one line a layer, `layer N  name:  modules`."""
    rows = re.findall(r"(?m)^\s+layer (\d)\s+\w+:\s+(.+)$", pathvlm.__doc__)
    return {f"pathvlm.{m}": int(n) for n, modules in rows for m in modules.split()}


def imports_of(path: str, name: str) -> set[str]:
    """Every project module `path` imports, at any depth of the file: "pathvlm.grpo", "rewards", "tools.paper"."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import; write `from pathvlm.x import ...`"
            if node.module in ("pathvlm", "tools", "data"):  # from pathvlm import grpo
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
    if name.startswith("bench."):  # bench's scripts put bench/ on sys.path: `from common import ...`
        found = {f"bench.{m}" if m == "common" else m for m in found}
    ours = ("pathvlm", "tools", "data", "bench", "rewards", *SCRIPTS)
    return {m for m in found if m.split(".")[0] in ours and m != "pathvlm"}


def project_files() -> dict[str, str]:
    """module name -> path, for every Python file outside tests/ and the virtual environment."""
    files = {}
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__", "runs")]
        for n in names:
            if n.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, n), ROOT)[:-3].replace(os.sep, ".")
                files[rel.removesuffix(".__init__")] = os.path.join(folder, n)
    return files


def allowed(importer: str, imported: str, layers: dict[str, int]) -> str | None:
    """Why importer may not import imported, or None when it may."""
    if importer.startswith("pathvlm."):
        if not imported.startswith("pathvlm."):
            return "the package imports no top-level file, tool, preparer or benchmark"
        if layers[imported] > layers[importer]:
            return f"layer {layers[importer]} imports layer {layers[imported]}"
        return None
    if importer.startswith("bench."):  # a benchmark measures the scripts themselves, so it may call into them
        return None
    if imported in SCRIPTS:
        return "a script is imported by nothing but bench/ (what two scripts share belongs in the package)"
    if importer == "rewards":
        return None if imported.startswith("pathvlm.") else "rewards.py stands on the package alone"
    if importer.startswith("tools."):
        if imported.startswith("tools.") and imported not in TOOL_SUPPORT:
            return "a tool imports no other tool"
        return None if imported.startswith(("pathvlm.", "tools.")) or imported == "rewards" else "tools import " \
            "the package, rewards.py and tools' own support modules"
    if importer.startswith("data."):
        return None if imported.startswith("pathvlm.") or imported == "data.common" else "a preparer imports the " \
            "package and data/common.py"
    return None if imported.startswith("pathvlm.") or imported == "rewards" else "a script imports the package " \
        "and rewards.py"


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of imports, each once: depth-first search, a back edge closes one."""
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def problems(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    out = [f"{a} -> {b}: {why}" for a in sorted(graph) for b in sorted(graph[a])
           if (why := allowed(a, b, layers))]
    return out + [f"circle: {' -> '.join(c)}" for c in circles(graph)]


def test_the_checker_finds_an_upward_import_a_circle_and_a_script_imported():
    layers = {"pathvlm.grpo": 1, "pathvlm.model": 2, "pathvlm.judges": 3}
    assert problems({"pathvlm.grpo": {"pathvlm.model"}, "pathvlm.model": set()}, layers) == [
        "pathvlm.grpo -> pathvlm.model: layer 1 imports layer 2"]
    found = problems({"pathvlm.model": {"pathvlm.judges"}, "pathvlm.judges": {"pathvlm.model"}}, layers)
    assert "circle: pathvlm.judges -> pathvlm.model -> pathvlm.judges" in found
    assert problems({"pathvlm.model": {"rewards"}}, layers) == [
        "pathvlm.model -> rewards: the package imports no top-level file, tool, preparer or benchmark"]
    assert problems({"eval": {"train_grpo"}}, layers)[0].startswith("eval -> train_grpo: a script is imported")
    assert problems({"bench.grpo_vs_trl": {"train_grpo"}}, layers) == []
    assert problems({"tools.report": {"tools.ablate"}}, layers) == ["tools.report -> tools.ablate: a tool imports "
                                                                     "no other tool"]
    assert problems({"tools.report": {"tools.paper", "pathvlm.grpo", "rewards"}}, layers) == []
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_table_names_every_module_of_the_package_once():
    layers = layer_table()
    modules = {m for m in project_files() if m.startswith("pathvlm.")}
    assert set(layers) == modules, f"in the table, not in pathvlm/: {set(layers) - modules}; " \
                                   f"in pathvlm/, not in the table: {modules - set(layers)}"
    assert sorted(set(layers.values())) == [1, 2, 3, 4]


def test_every_import_follows_the_layers():
    layers = layer_table()
    graph = {name: imports_of(path, name) for name, path in project_files().items()}
    assert problems(graph, layers) == []


@pytest.mark.parametrize("module", ["pathvlm.config", "pathvlm.allowed", "pathvlm.grpo", "pathvlm.errors"])
def test_the_lowest_modules_import_no_project_module(module):
    assert imports_of(project_files()[module], module) <= {"pathvlm.allowed"}


def test_the_docs_page_shows_the_same_layers():
    """docs/layers.md repeats the table for readers of the docs: it may not drift from the one enforced."""
    page = open(os.path.join(ROOT, "docs", "layers.md"), encoding="utf-8").read()
    rows = re.findall(r"(?m)^\| (\d) \w+ \| ((?:`\w+` ?)+) \|", page)
    shown = {f"pathvlm.{m}": int(n) for n, modules in rows for m in re.findall(r"`(\w+)`", modules)}
    assert shown == layer_table()
