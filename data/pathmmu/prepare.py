"""PathMMU -> sft / rl / test JSONL splits, as PathVLM-R1 uses it.

Download (gated): accept the licence at https://huggingface.co/datasets/jamessyx/PathMMU, then

    huggingface-cli download jamessyx/PathMMU data.json images.zip --repo-type dataset --local-dir ~/datasets/PathMMU

Prepare, from the repo root:

    python data/pathmmu/prepare.py --data-json ~/datasets/PathMMU/data.json \
        --images ~/datasets/PathMMU/images.zip --out data/pathmmu/prepared --seed 0

data.json is {subset: {split: [item]}}, subsets PubMed, EduContent, SocialPath, Atlas, PathCLS and splits
val, test, test_tiny. An item (the official loader opens <root>/images/<img>):

    {"No": 1, "img": "9e48...19b.jpg", "question": "...", "options": ["A) Bi-lobed nuclei", "B) ..."],
     "answer": "A) Bi-lobed nuclei", "explanation": "..."}

As the paper does, we keep PubMed and EduContent (5,385 questions, their images all in images.zip), pool
their splits, and deal them by seed into sft 3,000 / rl 1,000 / test the rest (1,385). --images may be
images.zip, read in place, or the folder it extracts to. report.json lists what was left out and why.
"""

import argparse
import json
import os
import posixpath
import random
import re
import sys
import zipfile
from collections import Counter

# Run as `python data/pathmmu/prepare.py` only this folder is on sys.path; add the repo root for mcq and data.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from data.common import NOT_AN_OPTION, answer_letter, image_path_in, require, save_image, write_report  # noqa: E402
from mcq import Record, SplitWriter  # noqa: E402

PAPER_SUBSETS = ["PubMed", "EduContent"]
PAPER_SFT, PAPER_RL, PAPER_TOTAL = 3000, 1000, 5385
TRAIN_SHARE = (PAPER_SFT + PAPER_RL) / PAPER_TOTAL  # 74.3% trains, 25.7% (1,385) is kept for test
OPTION_PREFIX = re.compile(r"^\s*[A-Z]\)\s*")  # "B) Skeletal muscle" -> "Skeletal muscle"
HOW_TO_GET = """PathMMU is gated on Hugging Face: accept its licence at https://huggingface.co/datasets/jamessyx/PathMMU,
download the two files data.json and images.zip, for example
    huggingface-cli download jamessyx/PathMMU data.json images.zip --repo-type dataset --local-dir ~/datasets/PathMMU
and pass them: --data-json ~/datasets/PathMMU/data.json --images ~/datasets/PathMMU/images.zip"""


def main(argv=None) -> dict:
    args = parse_args(argv)
    require(args.data_json, "PathMMU data.json", HOW_TO_GET)
    require(args.images, "PathMMU images (images.zip or its extracted folder)", HOW_TO_GET)
    with open(args.data_json) as f:
        data = json.load(f)
    images = ImageStore(args.images)

    filtered = Counter()
    items = pooled_items(data, args.subsets, filtered)
    random.Random(args.seed).shuffle(items)
    sizes = split_sizes(len(items), args.sft_size, args.rl_size)

    writer = SplitWriter(args.out)
    for item in items:
        record = to_record(item, images, writer)
        if record is not None:
            writer.add(next_split(writer, sizes), record)
    return write_report(writer, filtered, seed=args.seed, subsets=args.subsets, planned_sizes=sizes)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-json", required=True, help="PathMMU's data.json")
    p.add_argument("--images", required=True, help="PathMMU's images.zip, or the folder it extracts to")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepared"))
    p.add_argument("--seed", type=int, default=0, help="decides which items go to sft, rl and test")
    p.add_argument("--sft-size", type=int, default=PAPER_SFT)
    p.add_argument("--rl-size", type=int, default=PAPER_RL)
    p.add_argument("--subsets", nargs="+", default=PAPER_SUBSETS)
    return p.parse_args(argv)


def image_name(img) -> str:
    # The official loader joins <root>/images/<img>; some copies write "./images/<name>". Names in PubMed
    # and EduContent are content hashes, so the file name alone identifies the image.
    return posixpath.basename(str(img or "").replace("\\", "/"))


def pooled_items(data: dict, subsets: list[str], filtered: Counter) -> list[dict]:
    """Every item of the kept subsets, their splits pooled, each (image, question) once: a split such as
    test_tiny may repeat items of test, and a repeat would otherwise be counted, or even tested, twice."""
    items, seen = [], set()
    for subset, splits in data.items():
        if subset not in subsets:
            filtered[f"subset {subset} not used"] += sum(len(entries) for entries in splits.values())
            continue
        for split, entries in splits.items():
            for position, item in enumerate(entries, 1):
                key = (image_name(item.get("img")), " ".join(str(item.get("question", "")).split()))
                if key in seen:
                    filtered["repeat of an earlier item (same image and question)"] += 1
                    continue
                seen.add(key)
                items.append({**item, "id": f"pathmmu-{subset}-{split}-{item.get('No', position)}",
                              "source": f"pathmmu/{subset}/{split}"})
    return items


def split_sizes(total: int, sft_size: int, rl_size: int) -> dict:
    """sft and rl as asked and test the rest, when there are enough items to leave test its share in the
    paper (1,385 of 5,385). With fewer (a fixture, a partial download) sft and rl shrink by the same
    factor, keeping the paper's 3000 : 1000 : 1385 proportions: 27 items -> sft 15, rl 5, test 7."""
    needed = (sft_size + rl_size) / TRAIN_SHARE
    scale = min(1.0, total / max(needed, 1))
    sft, rl = round(sft_size * scale), round(rl_size * scale)
    return {"sft": sft, "rl": rl, "test": total - sft - rl}


def next_split(writer: SplitWriter, sizes: dict) -> str:
    """The first split not yet full. A broken record is skipped before it takes a slot, so what broken
    records cost comes out of test, which is 'the rest' anyway."""
    for split in ("sft", "rl"):
        if len(writer.splits.get(split, [])) < sizes[split]:
            return split
    return "test"


def to_record(item: dict, images: "ImageStore", writer: SplitWriter) -> Record | None:
    """The item as a Record with its image copied into the prepared folder; None when its answer is not
    one of its options. The writer checks everything else (question, options, image) when it is added."""
    options = [OPTION_PREFIX.sub("", str(o)).strip() for o in item.get("options") or []]
    letter = answer_letter(OPTION_PREFIX.sub("", str(item.get("answer", ""))), options)
    if letter is None:
        writer.skip(item["id"], NOT_AN_OPTION)
        return None
    image = image_path_in(image_name(item.get("img")))
    data = images.read(item.get("img"))
    if data is not None:  # a missing image is reported by the writer, which finds no file
        save_image(writer.out_dir, image, data)
    return Record(id=item["id"], image=image, question=str(item.get("question") or "").strip(),
                  options=options, answer=letter, explanation=str(item.get("explanation") or "").strip(),
                  source=item["source"])


class ImageStore:
    """PathMMU images by file name, read from images.zip in place (no extraction) or from a folder."""

    def __init__(self, path: str):
        self.zip = None
        if os.path.isdir(path):
            self.paths = {name: os.path.join(d, name) for d, _, names in os.walk(path) for name in names}
        elif zipfile.is_zipfile(path):
            self.zip = zipfile.ZipFile(path)
            self.paths = {posixpath.basename(n): n for n in self.zip.namelist() if not n.endswith("/")}
        else:
            raise SystemExit(f"error: {path} is neither a folder nor a zip archive (expected PathMMU's images.zip)")

    def read(self, img) -> bytes | None:
        found = self.paths.get(image_name(img))
        if found is None:
            return None
        if self.zip is not None:
            return self.zip.read(found)
        with open(found, "rb") as f:
            return f.read()


if __name__ == "__main__":
    main()
