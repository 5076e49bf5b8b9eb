"""What the data/<name>/prepare.py scripts share: stopping with download instructions when an input is
missing, placing images inside the prepared folder, mapping an answer text to its letter, and a report that
keeps items left out on purpose ("filtered") apart from broken ones ("skipped", by mcq.SplitWriter)."""

import os
from collections import Counter

from mcq import LETTERS, SplitWriter

NOT_AN_OPTION = "answer not among the options"


def require(path: str, what: str, how_to_get: str):
    """Stop before any work, naming the file and how to get it, rather than with a traceback."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {what} not found: {path}\n\n{how_to_get}")


def image_path_in(name: str) -> str:
    """Where a source image goes in the prepared folder: images/<name>. Empty, '.' and '..' parts are
    dropped, so a path taken from a dataset file cannot climb out of the folder."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(["images"] + parts)


def save_image(out_dir: str, image: str, data: bytes):
    """Write image bytes at `image`, a path from image_path_in (relative to out_dir, as the JSONL stores it)."""
    path = os.path.join(out_dir, image)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _squash(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def answer_letter(answer: str, options: list[str]) -> str | None:
    """The letter of the option whose text is `answer`, ignoring case and spacing. None when no option
    matches, or several identical ones do: the record is then skipped as NOT_AN_OPTION."""
    hits = [i for i, option in enumerate(options) if _squash(option) == _squash(answer)]
    return LETTERS[hits[0]] if len(hits) == 1 else None


def write_report(writer: SplitWriter, filtered: Counter, **extra) -> dict:
    """Write the splits and report.json. `filtered` counts valid items this preparation leaves out on
    purpose (another subset, an open question, a repeat); broken records are the writer's `skipped`."""
    if filtered:
        print(f"filtered {sum(filtered.values())} on purpose: {dict(filtered)}")
    return writer.write({"filtered": sum(filtered.values()), "filtered_by_reason": dict(filtered), **extra})
