"""PathMMU -> sft / rl / test JSONL splits, as PathVLM-R1 uses it, and a val split for the training curves.

Download (gated): accept the licence at https://huggingface.co/datasets/jamessyx/PathMMU, log in with
`hf auth login` (a token of that account), then

    hf download jamessyx/PathMMU data.json images.zip --repo-type dataset --local-dir ~/datasets/PathMMU

Prepare, from the repo root:

    python data/pathmmu/prepare.py --data-json ~/datasets/PathMMU/data.json \
        --images ~/datasets/PathMMU/images.zip --out data/pathmmu/prepared --seed 0

data.json is {subset: {split: [item]}}, subsets PubMed, EduContent, SocialPath, Atlas, PathCLS and splits
val, test, test_tiny. An item (the official loader opens <root>/images/<img>):

    {"No": 1, "img": "9e48...19b.jpg", "question": "...", "options": ["A) Bi-lobed nuclei", "B) ..."],
     "answer": "A) Bi-lobed nuclei", "explanation": "..."}

As the paper does, we keep PubMed and EduContent (5,385 questions, their images all in images.zip) and pool
their splits. PathMMU often asks several questions about one image, and some images exist under two file
names with identical bytes, so we deal whole images, grouped by a hash of their bytes, by seed into sft
3,000 / rl 1,000 / test the rest (1,385), as close to those sizes as the images allow: no image is in two
splits. Then val (--val-size, by default 150 of the ~1,385 left for test, in that proportion when fewer are
left) is carved out of test, whole images at a time (data/common.carve_by_image): the training-time curves
read it (configs/sft*.yaml eval_data), so they never score the test set. sft and rl keep the paper's 3,000
and 1,000 items; test, the rest (ours: the paper gives no test size for its pooled split), is ~1,235
(--val-size 0 keeps all of it and writes no val).
`--split-by question` deals single questions instead, as earlier versions did (for comparison: an image's
questions then land in training and in test). --images may be images.zip, read in place, or the
folder it extracts to. report.json lists what was left out and why, the sizes reached, the number of
images, how many file names were merged with an identical image, and how many images are in two splits.
"""

import argparse
import os
import posixpath
import random
import re
import sys
import zipfile
from collections import Counter

# Run as `python data/pathmmu/prepare.py` only this folder is on sys.path; add the repo root for pathvlm and data.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from data.common import (answer_letter, answer_problem, carve_by_image, copy_image, file_hash,  # noqa: E402
                         image_path_in, out_folder, outside, outside_reason, read_json, require, shape_error,
                         short, write_report)
from pathvlm.errors import run_script  # noqa: E402
from pathvlm.records import Record, SplitWriter, check_fields, check_record  # noqa: E402

PAPER_SUBSETS = ["PubMed", "EduContent"]
SPLITS = ["sft", "rl", "test", "val"]
PAPER_SFT, PAPER_RL, PAPER_TOTAL = 3000, 1000, 5385
VAL_SIZE = 150  # ours: out of test, for the training curves (configs/sft*.yaml: eval_items 128 of it)
TRAIN_SHARE = (PAPER_SFT + PAPER_RL) / PAPER_TOTAL  # 74.3% trains, 25.7% (1,385) is kept for test
DATA_SHAPE = '{subset: {split: [item]}}, an item {"No": 1, "img": ..., "question": ..., "options": [...], ...}'
OPTION_PREFIX = re.compile(r"^\s*[A-Z]\)\s*")  # "B) Skeletal muscle" -> "Skeletal muscle"
HOW_TO_GET = """PathMMU is gated on Hugging Face: accept its licence at https://huggingface.co/datasets/jamessyx/PathMMU,
log in with `hf auth login` and download the two files data.json and images.zip, for example
    hf download jamessyx/PathMMU data.json images.zip --repo-type dataset --local-dir ~/datasets/PathMMU
and pass them: --data-json ~/datasets/PathMMU/data.json --images ~/datasets/PathMMU/images.zip"""


def main(argv=None) -> dict:
    args = parse_args(argv)
    require(args.data_json, "PathMMU data.json", HOW_TO_GET)
    require(args.images, "PathMMU images (images.zip or its extracted folder)", HOW_TO_GET)
    data = read_json(args.data_json, f"PathMMU's data.json, {DATA_SHAPE}")
    check_shape(data, args.data_json)
    unknown = [subset for subset in args.subsets if subset not in data]
    if unknown:
        raise SystemExit(f"error: {args.data_json} has no subset {', '.join(map(repr, unknown))}; its subsets "
                         f"are {', '.join(data)} (choose with --subsets)")
    images = ImageStore(args.images)

    filtered = Counter()
    items = pooled_items(data, args.subsets, filtered)
    # Not one image found means a wrong --images, not broken items: stop before the old splits are replaced.
    if items and not any(images.has(item.get("img")) for item in items):
        raise SystemExit(f"error: none of the images named in {args.data_json} ({len(items)} questions) is in "
                         f"{args.images}; expected PathMMU's images.zip or the folder it extracts to")
    rng = random.Random(args.seed)
    rng.shuffle(items)
    sizes = split_sizes(len(items), args.sft_size, args.rl_size)

    writer = SplitWriter(args.out)
    records = valid_records(items, images, writer)
    # image path -> hash of its bytes: two file names with one hash are one image, dealt as one
    image_of = {path: file_hash(os.path.join(writer.out_dir, path)) for path in {r.image for r in records}}
    if args.split_by == "question":
        dealt = deal_questions(records, sizes)
    else:
        dealt = deal_images(image_groups(records, image_of), sizes, rng)
    # val after the deal, out of test (the rest) alone: sft and rl keep the paper's sizes and the same items
    sizes["val"] = val_size(args, len(dealt["test"]))
    dealt["test"], dealt["val"] = carve_by_image(dealt["test"], lambda r: image_of[r.image], sizes["val"], rng)
    sizes["test"] -= sizes["val"]
    for split in SPLITS:
        for record in dealt[split]:
            writer.add(split, record)
    return write_report(writer, filtered, SPLITS, seed=args.seed, subsets=args.subsets, split_by=args.split_by,
                        planned_sizes=sizes, **image_counts(dealt, image_of),
                        wanted=[split for split in SPLITS if split != "val" or sizes["val"]],
                        empty_hint=f"The sizes planned were {sizes}, of {len(items)} questions in --subsets "
                                   f"{' '.join(args.subsets)}, and the skipped records come out of test: raise "
                                   "--sft-size / --rl-size, add subsets, or fix what was skipped.")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-json", required=True, help="PathMMU's data.json")
    p.add_argument("--images", required=True, help="PathMMU's images.zip, or the folder it extracts to")
    p.add_argument("--out", type=out_folder,
                   default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepared"))
    p.add_argument("--seed", type=int, default=0, help="decides which items go to sft, rl and test")
    p.add_argument("--sft-size", type=int, default=PAPER_SFT)
    p.add_argument("--rl-size", type=int, default=PAPER_RL)
    p.add_argument("--val-size", type=int, default=None,
                   help=f"carved out of test, whole images at a time, for the training curves (0: no val); default "
                        f"{VAL_SIZE} of the ~{PAPER_TOTAL - PAPER_SFT - PAPER_RL} left for test, in that proportion "
                        "when fewer are left")
    p.add_argument("--subsets", nargs="+", default=PAPER_SUBSETS)
    p.add_argument("--split-by", choices=["image", "question"], default="image",
                   help="deal whole images (default: no image in two splits) or single questions (the old deal)")
    return p.parse_args(argv)


def val_size(args, test: int) -> int:
    """How many of the `test` questions dealt to test val takes: --val-size (at most all of them); by default
    VAL_SIZE of the paper-sized pool's test, in proportion for a smaller one (a fixture, a partial download)."""
    if args.val_size is None:
        return round(test * VAL_SIZE / (PAPER_TOTAL - PAPER_SFT - PAPER_RL))
    return min(test, max(0, args.val_size))


def check_shape(data, path: str):
    """Stop, naming the key, when data.json is not {subset: {split: [item]}} with items JSON objects: a
    wrong file (another dataset's JSON) would otherwise end in a traceback deep in the preparation."""
    if not isinstance(data, dict):
        raise shape_error(path, "the top level", data, DATA_SHAPE)
    for subset, splits in data.items():
        if not isinstance(splits, dict):
            raise shape_error(path, subset, splits, "{split: [item]}")
        for split, entries in splits.items():
            if not isinstance(entries, list):
                raise shape_error(path, f"{subset}/{split}", entries, "a list of items")
            for position, item in enumerate(entries):
                if not isinstance(item, dict):
                    raise shape_error(path, f"{subset}/{split}[{position}]", item, "an item object")


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


def valid_records(items: list[dict], images: "ImageStore", writer: SplitWriter) -> list[Record]:
    """The items as Records, in the seed's order, with their images copied into the prepared folder. Broken
    ones are skipped here, with the reason, before any is dealt, so that they take no slot in a split: what
    they cost comes out of test, which is 'the rest' anyway. Of two items with one id the first is kept."""
    records, seen = [], set()
    for item in items:
        record = to_record(item, images, writer)
        if record is None:
            continue
        reason = check_record(record, writer.out_dir, seen)
        if reason:
            writer.skip(record.id, reason)
            continue
        seen.add(record.id)
        records.append(record)
    return records


def deal_questions(records: list[Record], sizes: dict) -> dict:
    """The old deal, kept for comparison (--split-by question): the first sizes['sft'] records to sft, the
    next sizes['rl'] to rl, the rest to test, whatever image each shows."""
    sft_end = sizes["sft"]
    rl_end = sft_end + sizes["rl"]
    return {"sft": records[:sft_end], "rl": records[sft_end:rl_end], "test": records[rl_end:]}


def image_groups(records: list[Record], image_of: dict) -> list[list[Record]]:
    """The records grouped by the content hash of their image (image_of: image path -> hash): all questions
    about one image, under any of its file names, form one group."""
    groups = {}
    for record in records:
        groups.setdefault(image_of[record.image], []).append(record)
    return list(groups.values())


def deal_images(groups: list[list[Record]], sizes: dict, rng: random.Random) -> dict:
    """Whole images, in the seed's order, each into the first of sft and rl that still has room for all its
    questions, else into test. Images with one or two questions fill the last slots, so sft and rl come out
    at, or a few questions under, their planned sizes."""
    groups = list(groups)
    rng.shuffle(groups)  # first-appearance order would put images with many questions first
    dealt = {split: [] for split in SPLITS}
    for group in groups:
        dealt[split_with_room(dealt, sizes, len(group))] += group
    return dealt


def split_with_room(dealt: dict, sizes: dict, n: int) -> str:
    for split in ("sft", "rl"):
        if len(dealt[split]) + n <= sizes[split]:
            return split
    return "test"


def image_counts(dealt: dict, image_of: dict) -> dict:
    """For the report: images (by content), file names merged with an identical image under another name,
    and images with questions in more than one split: 0 when dealt by image, the leak when dealt by question."""
    splits_of = {}
    for split, records in dealt.items():
        for record in records:
            splits_of.setdefault(image_of[record.image], set()).add(split)
    counts = {"images": len(splits_of), "images_merged_by_content": len(image_of) - len(splits_of),
              "images_in_several_splits": sum(len(splits) > 1 for splits in splits_of.values())}
    print(f"{counts['images']} images ({counts['images_merged_by_content']} file names merged with an identical "
          f"image), {counts['images_in_several_splits']} of them in more than one split")
    return counts


def to_record(item: dict, images: "ImageStore", writer: SplitWriter) -> Record | None:
    """The item as a Record with its image copied into the prepared folder; None (skipped, with the reason)
    when its answer is not one of its options, a field is unusable or its image is not a decodable file inside
    --images. Nothing is copied for a skipped item. valid_records checks duplicate ids and the copy."""
    options = [OPTION_PREFIX.sub("", str(o)).strip() for o in item.get("options") or []]
    answer = OPTION_PREFIX.sub("", str(item.get("answer", "")))
    letter = answer_letter(answer, options)
    if letter is None:
        writer.skip(item["id"], answer_problem(answer, options))
        return None
    if not image_name(item.get("img")):
        writer.skip(item["id"], f"no image named: img is {short(item.get('img'))}")
        return None
    image = image_path_in(image_name(item.get("img")))
    record = Record(id=item["id"], image=image, question=str(item.get("question") or "").strip(), options=options,
                    answer=letter, explanation=str(item.get("explanation") or "").strip(), source=item["source"])
    problem = check_fields(record, set()) or images.outside(item.get("img"))
    data = None if problem else images.read(item.get("img"))
    if data is not None:  # a missing image is reported by the writer, which finds no file
        problem = copy_image(writer.out_dir, image, data, str(item.get("img")))
    if problem:
        writer.skip(item["id"], problem)
        return None
    return record


class ImageStore:
    """PathMMU images by file name, read from images.zip in place (no extraction) or from a folder."""

    def __init__(self, path: str):
        self.root, self.zip = path, None
        if os.path.isdir(path):
            self.paths = {name: os.path.join(d, name) for d, _, names in os.walk(path) for name in names}
        elif zipfile.is_zipfile(path):
            self.zip = zipfile.ZipFile(path)
            self.paths = {posixpath.basename(n): n for n in self.zip.namelist() if not n.endswith("/")}
        else:
            raise SystemExit(f"error: {path} is neither a folder nor a readable zip archive (a download cut short?); "
                             f"expected PathMMU's images.zip or the folder it extracts to")

    def has(self, img) -> bool:
        return image_name(img) in self.paths

    def outside(self, img) -> str | None:
        """The skip reason when the file of that name in the --images folder is a symlink out of it."""
        found = self.paths.get(image_name(img))
        real = None if found is None or self.zip is not None else outside(self.root, found)
        return real and outside_reason(found, self.root, real)

    def read(self, img) -> bytes | None:
        found = self.paths.get(image_name(img))
        if found is None:
            return None
        if self.zip is not None:
            return self.zip.read(found)
        with open(found, "rb") as f:
            return f.read()


if __name__ == "__main__":
    run_script(main)
