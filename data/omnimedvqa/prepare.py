"""OmniMedVQA -> four out-of-distribution test splits, as PathVLM-R1 evaluates it.

Download (open): OmniMedVQA.zip from https://huggingface.co/datasets/foreverbeliever/OmniMedVQA, then unzip:

    hf download foreverbeliever/OmniMedVQA OmniMedVQA.zip --repo-type dataset --local-dir ~/datasets
    unzip ~/datasets/OmniMedVQA.zip -d ~/datasets        # -> ~/datasets/OmniMedVQA/{Images,QA_information}

Prepare, from the repo root:

    python data/omnimedvqa/prepare.py --root ~/datasets/OmniMedVQA --out data/omnimedvqa/prepared

Each set is a JSON list in QA_information/Open-access/<set>.json; an item:

    {"dataset": "Chest CT Scan", "question_id": "...", "question_type": "Modality Recognition",
     "question": "What imaging technique is employed for obtaining this image?", "gt_answer": "CT",
     "image_path": "Images/Chest CT Scan/test/.../000139 (9).png", "option_A": "Mammogram", "option_B": "PET",
     "option_C": "CT", "option_D": "Fluoroscopy", "modality_type": "CT"}

gt_answer is the text of an option; option_C and option_D may be absent; image_path is relative to the
OmniMedVQA folder (an item whose image_path leads out of it, absolute, through ../ or a symlink, is skipped and
nothing is copied). Each set becomes one split, named by its slug (SETS below): chest_ct.jsonl (871 questions
in the release), isic2020.jsonl (1,580), oct_c8.jsonl (4,016), diabetic_retinopathy.jsonl (2,051). All four
are test splits and nothing is dealt, so no image can land in training. --root may also be OmniMedVQA.zip
itself, read in place without unzipping.
"""

import argparse
import os
import sys
import zipfile
from collections import Counter

# Run as `python data/omnimedvqa/prepare.py` only this folder is on sys.path; add the repo root for pathvlm and data.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from data.common import (answer_letter, answer_problem, copy_image, image_path_in, out_folder, outside,  # noqa: E402
                         outside_reason, parse_json, require, shape_error, short, write_report)
from pathvlm.errors import run_script  # noqa: E402
from pathvlm.records import Record, SplitWriter, check_fields  # noqa: E402

# The set's file name in QA_information/Open-access -> the split it becomes.
SETS = {"Chest CT Scan": "chest_ct", "ISIC2020": "isic2020", "Retinal OCT-C8": "oct_c8",
        "Diabetic Retinopathy": "diabetic_retinopathy"}
OPTION_KEYS = ["option_A", "option_B", "option_C", "option_D"]
HOW_TO_GET = """Download OmniMedVQA.zip from https://huggingface.co/datasets/foreverbeliever/OmniMedVQA (open access), e.g.
    hf download foreverbeliever/OmniMedVQA OmniMedVQA.zip --repo-type dataset --local-dir ~/datasets
    unzip ~/datasets/OmniMedVQA.zip -d ~/datasets
and pass the folder that holds QA_information/ and Images/: --root ~/datasets/OmniMedVQA
(or the zip itself: --root ~/datasets/OmniMedVQA.zip)"""
QA_DIR = "QA_information/Open-access"


def main(argv=None) -> dict:
    args = parse_args(argv)
    require(args.root, "OmniMedVQA folder", HOW_TO_GET)
    files = OmniMedVQAFiles(args.root)
    items = {name: set_items(files, name) for name in args.sets}  # every set read before anything is written

    writer = SplitWriter(args.out)
    for name in args.sets:
        for position, item in enumerate(items[name]):
            record = to_record(item, name, position, files, writer)
            if record is not None:
                writer.add(SETS[name], record)
    return write_report(writer, Counter(), list(SETS.values()), sets={name: SETS[name] for name in args.sets},
                        wanted=[SETS[name] for name in args.sets],
                        empty_hint="Its set file holds no item, or every item was skipped.")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the OmniMedVQA folder (holds QA_information/ and Images/)")
    p.add_argument("--out", type=out_folder,
                   default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepared"))
    p.add_argument("--sets", nargs="+", default=list(SETS), metavar="SET",
                   help=f"set names or slugs, default all: {', '.join(f'{n!r} ({s})' for n, s in SETS.items())}")
    args = p.parse_args(argv)
    by_slug = {slug: name for name, slug in SETS.items()}
    unknown = [s for s in args.sets if s not in SETS and s not in by_slug]
    if unknown:
        p.error(f"unknown set(s) {unknown}; choose from {list(SETS)} or {list(by_slug)}")
    args.sets = [by_slug.get(s, s) for s in args.sets]
    return args


def set_items(files: "OmniMedVQAFiles", name: str) -> list[dict]:
    """The set's items; a stop naming the file when it is missing or not a JSON list of item objects."""
    path = files.where(f"{QA_DIR}/{name}.json")
    if not files.exists(f"{QA_DIR}/{name}.json"):
        raise SystemExit(f"error: OmniMedVQA set {name!r} not found: {path}\n\n{HOW_TO_GET}")
    items = parse_json(files.read(f"{QA_DIR}/{name}.json"), path, "a JSON list of OmniMedVQA items")
    if not isinstance(items, list):
        raise shape_error(path, "the top level", items, "a list of items")
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise shape_error(path, f"item [{position}]", item, 'an item object {"question": ..., "gt_answer": ...}')
    return items


def to_record(item: dict, name: str, position: int, files: "OmniMedVQAFiles", writer: SplitWriter) -> Record | None:
    """The item as a Record with its image copied into the prepared folder; None (skipped, with the reason)
    when gt_answer is not one of its options, a field is unusable, or image_path does not lead to a decodable
    image inside the OmniMedVQA folder. Nothing is copied for a skipped item; the writer checks duplicate ids."""
    record_id = f"omnimedvqa-{SETS[name]}-{item.get('question_id', position)}"
    options = [str(item[key]) for key in OPTION_KEYS if item.get(key) is not None]
    answer = str(item.get("gt_answer", ""))
    letter = answer_letter(answer, options)
    if letter is None:
        writer.skip(record_id, answer_problem(answer, options))
        return None
    source_path = str(item.get("image_path") or "")
    if not source_path.strip():
        writer.skip(record_id, f"no image named: image_path is {short(item.get('image_path'))}")
        return None
    # Keep the source's folders (file names repeat across class folders); drop the common "Images/".
    image = image_path_in(source_path.removeprefix("Images/"))
    record = Record(id=record_id, image=image, question=str(item.get("question") or "").strip(), options=options,
                    answer=letter, source=f"omnimedvqa/{name}")
    problem = check_fields(record, set()) or files.outside(source_path)
    data = None if problem else files.read(source_path)
    if data is not None:  # a missing image is reported by the writer, which finds no file
        problem = copy_image(writer.out_dir, image, data, source_path)
    if problem:
        writer.skip(record_id, problem)
        return None
    return record


class OmniMedVQAFiles:
    """OmniMedVQA's files by their path inside the OmniMedVQA folder ("QA_information/...", "Images/..."),
    read from that folder or, as the PathMMU preparer reads images.zip, from OmniMedVQA.zip in place."""

    def __init__(self, root: str):
        self.root, self.zip, self.prefix = root, None, ""
        if os.path.isdir(root):
            check_root_folder(root)
        elif zipfile.is_zipfile(root):
            self.zip = zipfile.ZipFile(root)
            self.names = set(self.zip.namelist())
            self.prefix = zip_prefix(root, self.names)
        else:
            raise SystemExit(f"error: {root} is neither a folder nor a readable zip archive (a download cut short?); "
                             f"expected the OmniMedVQA folder (holding QA_information/ and Images/) or OmniMedVQA.zip"
                             f"\n\n{HOW_TO_GET}")

    def where(self, path: str) -> str:
        """How a message names the file: its path on disk, or zip:member."""
        return f"{self.root}:{self.prefix}{path}" if self.zip else os.path.join(self.root, path)

    def outside(self, path: str) -> str | None:
        """The skip reason when image_path leads out of the OmniMedVQA folder: absolute, through "..", or
        through a symlink. A zip's members are all inside it, but such a path is refused there too."""
        if self.zip:
            climbs = path.startswith("/") or ".." in path.replace("\\", "/").split("/")
            return outside_reason(path, self.where("")) if climbs else None
        real = outside(self.root, path)
        return real and outside_reason(path, self.root, real)

    def exists(self, path: str) -> bool:
        return self.prefix + path in self.names if self.zip else os.path.isfile(os.path.join(self.root, path))

    def read(self, path: str) -> bytes | None:
        if not self.exists(path):
            return None
        if self.zip:
            return self.zip.read(self.prefix + path)
        with open(os.path.join(self.root, path), "rb") as f:
            return f.read()


def check_root_folder(root: str):
    """Stop when --root is not the folder that holds QA_information/, saying where that folder was found
    when --root is one level above it (the folder unzip made it in) or below it (QA_information/, Images/)."""
    if os.path.isdir(os.path.join(root, "QA_information")):
        return
    for name in sorted(os.listdir(root)):  # usually OmniMedVQA/, the folder unzip made
        below = os.path.normpath(os.path.join(root, name))
        if os.path.isdir(os.path.join(below, "QA_information")):
            raise SystemExit(f"error: no QA_information/ in {root}, but its subfolder {name}/ holds it (one level "
                             f"down): pass --root {below}")
    parent = os.path.dirname(os.path.abspath(root))
    for above in (parent, os.path.dirname(parent)):
        if os.path.isdir(os.path.join(above, "QA_information")):
            raise SystemExit(f"error: no QA_information/ in {root}; it is inside the OmniMedVQA folder {above}, "
                             f"which holds QA_information/ (one level up or two): pass --root {above}")
    raise SystemExit(f"error: no QA_information/ in {root}, nor in the folders just above or below it; expected "
                     f"the OmniMedVQA folder (holding QA_information/ and Images/)\n\n{HOW_TO_GET}")


def zip_prefix(path: str, names: set) -> str:
    """What comes before QA_information/ in the zip's member names ("OmniMedVQA/" when it unzips into a
    folder of that name): member paths are that prefix + the path inside the OmniMedVQA folder."""
    for name in sorted(names):
        if f"{QA_DIR}/" in name and not name.startswith("__MACOSX"):
            return name[:name.index(QA_DIR)]
    raise SystemExit(f"error: {path} holds no {QA_DIR}/ folder; expected OmniMedVQA.zip\n\n{HOW_TO_GET}")


if __name__ == "__main__":
    run_script(main)
