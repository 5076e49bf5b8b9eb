"""PathVQA questions -> a test split: the yes/no (closed) questions PathVLM-R1 evaluates, by default; with
--kind open or all, the open questions as well.

Download (open): the parquet files of https://huggingface.co/datasets/flaviagiammarino/path-vqa, e.g. the test split

    hf download flaviagiammarino/path-vqa --repo-type dataset --include "data/test-*" \
        --local-dir ~/datasets/path-vqa

Prepare, from the repo root:

    python data/pathvqa/prepare.py --parquet ~/datasets/path-vqa/data --split test --out data/pathvqa/prepared

Each parquet row has image ({"bytes": <jpeg>, "path": ...}), question and answer; the test split is 6,719
rows in data/test-0000?-of-0000?-<hash>.parquet shards. --kind chooses which rows become records:

    closed (default)  rows answered "yes" or "no" (any case): options ["yes", "no"], answer the letter. The
                      paper's evaluation, and what configs/eval.yaml reads as pathvqa_closed.
    open              every other row: options [], answer the dataset's answer text, stripped (lower-case free
                      text such as "granulomas" or "in the lung"); no alternatives, as PathVQA gives none.
    all               both, in one split.

Rows of the kind not asked for are counted in the report under "filtered" (a closed run's open questions,
an open run's yes/no ones), apart from broken rows under "skipped": a row without an answer, without image
bytes, with an image that does not decode, or with an empty question. The report's "kinds" counts the records
kept of each kind. Images are written once each as PNG, named by a hash of their bytes.

One run prepares one split, the dataset's own (nothing is dealt here), into <split>.jsonl with its report
report-<split>.json for --kind closed, and <split>_open.jsonl or <split>_all.jsonl (report-<split>_open.json,
...) for the others: test and train, closed and open, prepared into one folder keep a file and a report each,
and an open run never overwrites the closed split an eval config names.
"""

import argparse
import glob
import hashlib
import io
import os
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

# Run as `python data/pathvqa/prepare.py` only this folder is on sys.path; add the repo root for pathvlm and data.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from data.common import image_path_in, out_folder, require, save_image, write_report  # noqa: E402
from pathvlm.errors import run_script  # noqa: E402
from pathvlm.images import image_problem, open_image  # noqa: E402
from pathvlm.records import Record, SplitWriter  # noqa: E402

OPTIONS = ["yes", "no"]
KINDS = {"closed": ["closed"], "open": ["open"], "all": ["closed", "open"]}  # --kind -> the record kinds kept
FILTERED = {"closed": "closed question (yes/no)", "open": "open question (not yes/no)"}  # why a row is left out
EMPTY_ANSWER = "empty answer: the parquet row has no answer text, so there is nothing to score against"
COLUMNS = ["image", "question", "answer"]
HOW_TO_GET = """Download the PathVQA parquet files from https://huggingface.co/datasets/flaviagiammarino/path-vqa, e.g.
    hf download flaviagiammarino/path-vqa --repo-type dataset --include "data/test-*" --local-dir ~/datasets/path-vqa
and pass a file or the folder holding them: --parquet ~/datasets/path-vqa/data --split test"""


def main(argv=None) -> dict:
    args = parse_args(argv)
    files = parquet_files(args.parquet, args.split)
    name = split_name(args.split, args.kind)
    writer = SplitWriter(args.out)
    filtered = Counter()
    written = set()  # PNGs already written in this run: many questions share one image
    for row_number, row in enumerate(read_rows(files)):
        # Ids number the rows, whatever the kind: a row has the same id in a closed, an open and an all split.
        record_id = f"pathvqa-{args.split}-{row_number:05d}"
        answer = str(row["answer"] or "").strip()
        if not answer:  # neither yes/no nor a reference: broken whatever --kind asks for
            writer.skip(record_id, EMPTY_ANSWER)
            continue
        kind = "closed" if answer.lower() in OPTIONS else "open"
        if kind not in KINDS[args.kind]:
            filtered[FILTERED[kind]] += 1
            continue
        image = png_image(row["image"], record_id, writer, written)
        if image is None:
            continue
        if kind == "closed":
            options, answer = list(OPTIONS), "AB"[OPTIONS.index(answer.lower())]
        else:
            options = []
        writer.add(name, Record(id=record_id, image=image, question=str(row["question"] or "").strip(),
                                options=options, answer=answer, source=f"pathvqa/{args.split}"))
    kinds = Counter(record.kind for record in writer.splits.get(name, []))
    kinds = {kind: kinds[kind] for kind in KINDS["all"]}
    asked = " or ".join("a yes/no question" if k == "closed" else "an open question" for k in KINDS[args.kind])
    report = write_report(writer, filtered, [name], report_name=f"report-{name}.json", split=args.split,
                          kind=args.kind, kinds=kinds, parquet_files=[os.path.basename(f) for f in files],
                          empty_hint=f"No row of {args.split}-*.parquet is {asked} with a readable image: "
                                     "check --parquet, --split and --kind.")
    print(f"kinds kept in {name}: " + ", ".join(f"{kind} {n}" for kind, n in kinds.items()) + f" (--kind {args.kind})")
    return report


def split_name(split: str, kind: str) -> str:
    """The prepared file's name: <split> for the default closed questions (the name configs/eval.yaml reads),
    <split>_open / <split>_all otherwise, so that no kind overwrites another's file in one folder."""
    return split if kind == "closed" else f"{split}_{kind}"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parquet", required=True, help="a parquet file, or a folder searched for <split>-*.parquet")
    p.add_argument("--split", default="test", help="which split's files to read from a folder; names the output")
    p.add_argument("--kind", choices=list(KINDS), default="closed",
                   help="closed (default): the yes/no questions, as PathVLM-R1 evaluates PathVQA, into "
                        "<split>.jsonl; open: the other questions, answered in free text, into <split>_open.jsonl; "
                        "all: both, into <split>_all.jsonl")
    p.add_argument("--out", type=out_folder,
                   default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepared"))
    return p.parse_args(argv)


def parquet_files(path: str, split: str) -> list[str]:
    """The file given, or the folder's <split>-*.parquet shards in name order, so row numbers (and so ids)
    are the same on every run. Each file is opened here, so a wrong one stops the run before any work."""
    require(path, "PathVQA parquet file or folder", HOW_TO_GET)
    if not os.path.isdir(path):
        files = [path]
    else:
        files = sorted(glob.glob(os.path.join(path, "**", f"{split}-*.parquet"), recursive=True))
    if not files:
        raise SystemExit(f"error: no {split}-*.parquet file under {path}; {splits_found(path)}\n\n{HOW_TO_GET}")
    for file in files:
        check_parquet(file)
    return files


def splits_found(folder: str) -> str:
    """Which splits the folder does hold, from the shard names <split>-00000-of-00002-<hash>.parquet."""
    names = glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True)
    splits = sorted({os.path.basename(name).split("-")[0] for name in names})
    if not splits:
        return "it holds no .parquet file at all"
    return f"the splits there are: {', '.join(splits)} (choose one with --split)"


def check_parquet(path: str):
    """Stop, naming the file, when it is not a parquet file or lacks PathVQA's columns."""
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except (pa.ArrowException, OSError) as e:  # not parquet at all, or unreadable
        raise SystemExit(f"error: {path} is not a readable parquet file ({e}); expected a PathVQA shard such as "
                         f"test-00000-of-00002-<hash>.parquet") from None
    if not set(COLUMNS) <= set(names):
        raise SystemExit(f"error: {path} has columns {names}, expected {COLUMNS}")


def read_rows(files: list[str]):
    for path in files:
        # Batches keep memory flat: the test split's images are a few hundred MB.
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256, columns=COLUMNS):
            yield from batch.to_pylist()


def png_image(image: dict | None, record_id: str, writer: SplitWriter, written: set) -> str | None:
    """The row's image written as 8-bit RGB PNG into the prepared folder, or None (and the row skipped, with
    the reason) when it has no bytes or images.image_problem finds one (they do not decode to the end, or the
    image is too elongated for the processor)."""
    data = (image or {}).get("bytes")
    if not data:
        writer.skip(record_id, "image missing: no bytes in the parquet row")
        return None
    path = image_path_in(hashlib.sha1(data).hexdigest()[:16] + ".png")
    if path not in written:
        problem = image_problem(io.BytesIO(data), f"parquet row {record_id}, {len(data)} bytes starting {data[:16]!r}")
        if problem:
            writer.skip(record_id, problem)
            return None
        png = io.BytesIO()
        open_image(io.BytesIO(data)).save(png, format="PNG")  # 8-bit RGB whatever the source's mode (images.to_rgb)
        save_image(writer.out_dir, path, png.getvalue())
        written.add(path)
    return path


if __name__ == "__main__":
    run_script(main)
