"""What the data/<name>/prepare.py scripts share: stopping with a clear message when an input is missing or
malformed, reading images only from inside the dataset and copying only those that decode, mapping an answer
text to its letter, and a report that keeps items left out on purpose ("filtered") apart from broken ones
("skipped", by records.SplitWriter) and says when a split comes out empty."""

import argparse
import io
import json
import os
import sys
from collections import Counter

from pathvlm.images import file_sha256, image_problem
from pathvlm.records import LETTERS, SplitWriter

NOT_AN_OPTION = "answer not among the options"
SEVERAL_OPTIONS = "answer matches several identical options"


def require(path: str, what: str, how_to_get: str):
    """Stop before any work, naming the file and how to get it, rather than with a traceback."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {what} not found: {path}\n\n{how_to_get}")


def out_folder(path: str) -> str:
    """--out as argparse checks it (type=out_folder), before any work: a folder, or a path where one can be made."""
    above = os.path.abspath(path)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        where = "is a file" if above == os.path.abspath(path) else f"is inside {above}, which is a file"
        raise argparse.ArgumentTypeError(f"{path} {where}: give a folder to write the splits and images into")
    return path


def read_json(path: str, what: str):
    """The parsed JSON file at `path`, or a stop naming the file and what it should be. `what` describes the
    expected file, e.g. "PathMMU's data.json ({subset: {split: [item]}})"."""
    if os.path.isdir(path):
        raise SystemExit(f"error: {path} is a folder, expected {what}")
    with open(path, "rb") as f:
        return parse_json(f.read(), path, what)


def parse_json(data: bytes, path: str, what: str):
    """`data`, the bytes of the file at `path`, parsed as JSON; a stop naming the file when they are not."""
    try:
        return json.loads(data)
    except ValueError as e:  # JSONDecodeError, or bytes that are not text at all (a zip passed by mistake)
        raise SystemExit(f"error: {path} is not valid JSON ({e}); expected {what}") from None


def shape_error(path: str, where: str, value, expected: str) -> SystemExit:
    """The stop for a JSON file whose content has the wrong shape: which file, which key, what was found."""
    return SystemExit(f"error: {path}: {where} is {type(value).__name__} {short(value)}, expected {expected}")


def short(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, for quoting an offending value in a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def image_path_in(name: str) -> str:
    """Where a source image goes in the prepared folder: images/<name>. Empty, '.' and '..' parts are
    dropped, so a path taken from a dataset file cannot climb out of the folder."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(["images"] + parts)


def outside(root: str, path: str) -> str | None:
    """Where `path`, a path read from a dataset file and taken relative to the dataset folder `root`, really
    leads when that is outside `root` (an absolute path, ../, a symlink out), else None. A dataset's JSON
    must not make a preparer copy a file from elsewhere into the prepared folder."""
    real, base = os.path.realpath(os.path.join(root, path)), os.path.realpath(root)
    return None if os.path.commonpath([real, base]) == base else real


def outside_reason(path: str, root: str, real: str = "") -> str:
    """The skip reason for an image path that leads out of the dataset folder `root` (to `real`)."""
    to = f" (to {real})" if real else ""
    return (f"image outside the dataset folder: {short(path, 120)} leads out of {root}{to}; nothing was copied: "
            "fix the path, or put the file inside the dataset folder")


def copy_image(out_dir: str, image: str, data: bytes, source: str) -> str | None:
    """save_image when the bytes decode (images.image_problem); else nothing is written and the reason, naming
    `source` (where the bytes came from), is returned for the writer's skip."""
    problem = image_problem(io.BytesIO(data), source)
    if problem is None:
        save_image(out_dir, image, data)
    return problem


def save_image(out_dir: str, image: str, data: bytes):
    """Write image bytes at `image`, a path from image_path_in (relative to out_dir, as the JSONL stores it)."""
    path = os.path.join(out_dir, image)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def file_hash(path: str) -> str:
    """sha256 of a file's bytes: two file names with the same hash are the same image."""
    return file_sha256(path)


def carve_by_image(records: list, image_of, size: int, rng) -> tuple[list, list]:
    """(kept, carved): the records of whole images moved out of `records` into `carved`, images in the order
    `rng` (a random.Random) shuffles them to, until carved holds `size` records. An image whose questions would
    take carved past `size` is passed over, so carved comes out at `size` or a few under it. `image_of(record)`
    is the image's identity (PathMMU: a hash of its bytes, as its deal uses): no image ends up on both sides,
    so a validation split carved out of a training split is image-disjoint from it, as the splits are."""
    groups = {}
    for record in records:
        groups.setdefault(image_of(record), []).append(record)
    order = list(groups)
    rng.shuffle(order)
    carved_images, n = set(), 0
    for image in order:
        if n + len(groups[image]) <= size:
            carved_images.add(image)
            n += len(groups[image])
    kept = [r for r in records if image_of(r) not in carved_images]
    return kept, [r for r in records if image_of(r) in carved_images]


def _squash(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def answer_letter(answer: str, options: list[str]) -> str | None:
    """The letter of the option whose text is `answer`, ignoring case and spacing. None when no option
    matches, or several identical ones do: the record is then skipped with answer_problem's reason."""
    hits = [i for i, option in enumerate(options) if _squash(option) == _squash(answer)]
    return LETTERS[hits[0]] if len(hits) == 1 else None


def answer_problem(answer: str, options: list[str]) -> str:
    """The skip reason when answer_letter finds no letter, quoting the answer and the options so that the
    report shows what to fix. The reason's name (before the colon) is what report.json counts by."""
    hits = sum(_squash(option) == _squash(answer) for option in options)
    reason = SEVERAL_OPTIONS if hits > 1 else NOT_AN_OPTION
    return f"{reason}: {short(answer)} (options {short(options, 200)})"


def write_report(writer: SplitWriter, filtered: Counter, split_names: list[str], report_name: str = "report.json",
                 wanted: list[str] | None = None, empty_hint: str = "", **extra) -> dict:
    """Write the splits and the report. `filtered` counts valid items this preparation leaves out on purpose
    (another subset, an open question, a repeat); broken records are the writer's `skipped`.

    `split_names` are every split this preparer can write into the folder: a file of one of them that this
    run did not write (an empty split, a set not asked for this time) is left from an earlier run, and is
    removed so that the folder holds only what the new report describes. SplitWriter always writes
    report.json; a preparer whose splits keep a report each (PathVQA) names it with `report_name`.

    `wanted` are the splits this run was asked to write (default: split_names). One that came out empty gets no
    file, a place in the report's "empty_splits" and a warning, with `empty_hint` saying what to change."""
    if filtered:
        print(f"filtered {sum(filtered.values())} on purpose: {dict(filtered)}")
    empty = [name for name in (split_names if wanted is None else wanted) if name not in writer.splits]
    stale = [f"{name}.jsonl" for name in split_names
             if name not in writer.splits and os.path.isfile(os.path.join(writer.out_dir, f"{name}.jsonl"))]
    report = writer.write({"filtered": sum(filtered.values()), "filtered_by_reason": dict(filtered),
                           "removed_stale_splits": stale, "empty_splits": empty, **extra})
    for name in stale:
        os.remove(os.path.join(writer.out_dir, name))
        print(f"removed {os.path.join(writer.out_dir, name)}, left by an earlier run")
    if report_name != "report.json":
        os.replace(os.path.join(writer.out_dir, "report.json"), os.path.join(writer.out_dir, report_name))
        print(f"report: {os.path.join(writer.out_dir, report_name)}")
    for name in empty:
        print(f"warning: split '{name}' is empty: no {name}.jsonl was written, and a run given it will stop. "
              f"{empty_hint} See {os.path.join(writer.out_dir, report_name)} for what was skipped or filtered.",
              file=sys.stderr)
    return report
