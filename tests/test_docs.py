"""The README and the pages beside it point at things that exist: every relative link (and its #anchor),
every `python <file>`, `pip install -r <file>`, `make <target>`, `configs/<name>` and module path they name.
A file moved or renamed, a Makefile target dropped, a heading retitled: the page that still names it fails
here, not in a reader's terminal. And the README stays a five-minute read: at most 250 lines.

Plain regexes over the markdown; no markdown library, no network."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
# Named because it does not exist: the bad-input table's "YAML file missing" row (docs/bad-inputs.md).
MEANT_MISSING = {"configs/sft_typo.yaml"}

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
PYTHON_FILE = re.compile(r"\bpython[\d.]*\s+([\w./<>*-]+\.py)\b")
PIP_FILE = re.compile(r"\bpip install -r\s+([\w./-]+)")
MAKE_TARGET = re.compile(r"(?:^|[\s;&|(`])make\s+([A-Za-z][\w-]*)")
# paths into the repository's own folders; data/ only as its preparers (data/<name>/prepared/ is made by them)
REPO_PATH = re.compile(r"(?<![\w./~$<-])((?:configs|pathvlm|tools|bench|tests|notebooks|docs)/[\w./*<>-]*[\w*>]"
                       r"|data/[\w-]+/prepare\.py)")
MAKE_RULE = re.compile(r"^([A-Za-z][\w-]*)\s*:(?!=)", re.M)


def blank(text: str, pattern: re.Pattern) -> str:
    """text with every match of pattern replaced by spaces, newlines kept (offsets and line numbers hold)."""
    return pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def parts(text: str) -> tuple[str, str]:
    """(prose, code): prose with code blocks and code spans blanked out; code with everything else blanked."""
    no_fences = blank(text, FENCE)
    prose = blank(no_fences, CODE_SPAN)
    code = "".join(" " if p != "\n" and p == c else c for p, c in zip(prose, text))
    return prose, code


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link syntax and punctuation dropped, lower case, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(blank(path.read_text(encoding="utf-8"), FENCE)):  # a code span stays in its heading
        s = slug(m.group(2))
        out.add(s if s not in seen else f"{s}-{seen[s]}")  # GitHub numbers a repeated heading's anchor
        seen[s] = seen.get(s, 0) + 1
    return out


def make_targets() -> set[str]:
    return set(MAKE_RULE.findall((ROOT / "Makefile").read_text(encoding="utf-8")))


def exists(rel: str) -> bool:
    if "*" in rel:
        return any(ROOT.glob(rel))
    return (ROOT / rel).exists()


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    prose, _ = parts(text)
    broken = []
    for m in LINK.finditer(prose):
        target = m.group(1)
        if re.match(r"[a-z][\w+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        where = f"{page_id(page)}:{line_of(text, m.start())}: ({target})"
        if not dest.exists():
            broken.append(f"{where}: no such file {os.path.relpath(dest, ROOT)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where}: no heading with anchor #{anchor} in {os.path.relpath(dest, ROOT)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_files_and_targets_exist(page):
    text = page.read_text(encoding="utf-8")
    _, code = parts(text)
    targets = make_targets()
    missing, said = [], set()

    def check(rel: str, offset: int, what: str):
        where = f"{page_id(page)}:{line_of(text, offset)}"
        if "<" in rel or "..." in rel or rel in MEANT_MISSING or (where, rel) in said:
            return
        if not exists(rel):
            said.add((where, rel))
            missing.append(f"{where}: {what} {rel} does not exist")

    for m in PYTHON_FILE.finditer(text):
        check(m.group(1), m.start(1), "python")
    for m in PIP_FILE.finditer(text):
        check(m.group(1), m.start(1), "pip install -r")
    for m in REPO_PATH.finditer(text):
        check(m.group(1), m.start(1), "path")
    for m in MAKE_TARGET.finditer(code):
        if m.group(1) not in targets:
            missing.append(f"{page_id(page)}:{line_of(text, m.start(1))}: make {m.group(1)}: no such target "
                           f"in the Makefile (it has {', '.join(sorted(targets))})")
    assert not missing, "named but missing:\n" + "\n".join(missing)


def test_meant_missing_stays_missing():
    # the bad-input table's example of a missing YAML only shows that error while the file is absent
    for rel in MEANT_MISSING:
        assert not (ROOT / rel).exists(), f"{rel} now exists: the docs use it as the example of a missing file"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move detail to docs/"


def test_every_docs_page_is_linked_from_the_readme():
    prose, _ = parts(README.read_text(encoding="utf-8"))
    linked = {(README.parent / m.group(1).partition("#")[0]).resolve() for m in LINK.finditer(prose)}
    unlinked = [page_id(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"no link in README.md leads to {', '.join(unlinked)}"


def test_the_checks_catch_breakage(tmp_path):
    """The regexes themselves, on a page with one of each kind of mistake (a checker that finds nothing
    passes every page)."""
    assert slug("The process reward (R1) and its judge") == "the-process-reward-r1-and-its-judge"
    assert slug("Why the demo SFT runs 1,200 steps") == "why-the-demo-sft-runs-1200-steps"
    assert slug("`make demo`: the paper's table") == "make-demo-the-papers-table"
    page = ("# Title\n\n[ok](#title) [gone](nowhere.md) [bad anchor](#no-such)\n\n## Title\n\n## In `pathvlm/`\n\n"
            "Run `python tools/nothing.py` or `make nothing`.\n\n```bash\nmake demo\n```\n"
            "See configs/nothing.yaml and `pathvlm/nothing.py`, not `tools/<name>.py`.\n")
    prose, code = parts(page)
    assert [m.group(1) for m in LINK.finditer(prose)] == ["#title", "nowhere.md", "#no-such"]
    assert [m.group(1) for m in MAKE_TARGET.finditer(code)] == ["nothing", "demo"]
    assert [m.group(1) for m in PYTHON_FILE.finditer(page)] == ["tools/nothing.py"]
    assert [m.group(1) for m in REPO_PATH.finditer(page)] == ["tools/nothing.py", "configs/nothing.yaml",
                                                              "pathvlm/nothing.py", "tools/<name>.py"]
    doc = tmp_path / "page.md"
    doc.write_text(page, encoding="utf-8")
    assert anchors(doc) == {"title", "title-1", "in-pathvlm"}
