"""OmniMedVQA -> four out-of-distribution test splits, as PathVLM-R1 evaluates it.

Download (open): OmniMedVQA.zip from https://huggingface.co/datasets/foreverbeliever/OmniMedVQA, then unzip:

    huggingface-cli download foreverbeliever/OmniMedVQA OmniMedVQA.zip --repo-type dataset --local-dir ~/datasets
    unzip ~/datasets/OmniMedVQA.zip -d ~/datasets        # -> ~/datasets/OmniMedVQA/{Images,QA_information}

Prepare, from the repo root:

    python data/omnimedvqa/prepare.py --root ~/datasets/OmniMedVQA --out data/omnimedvqa/prepared

Each set is a JSON list in QA_information/Open-access/<set>.json; an item:

    {"dataset": "Chest CT Scan", "question_id": "...", "question_type": "Modality Recognition",
     "question": "What imaging technique is employed for obtaining this image?", "gt_answer": "CT",
     "image_path": "Images/Chest CT Scan/test/.../000139 (9).png", "option_A": "Mammogram", "option_B": "PET",
     "option_C": "CT", "option_D": "Fluoroscopy", "modality_type": "CT"}

gt_answer is the text of an option; option_C and option_D may be absent; image_path is relative to the
OmniMedVQA folder. Each set becomes one split, named by its slug (SETS below): chest_ct.jsonl (871 questions
in the release), isic2020.jsonl (1,580), oct_c8.jsonl (4,016), diabetic_retinopathy.jsonl (2,051).
"""

import argparse
import json
import os
import sys
from collections import Counter

# Run as `python data/omnimedvqa/prepare.py` only this folder is on sys.path; add the repo root for mcq and data.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from data.common import NOT_AN_OPTION, answer_letter, image_path_in, require, save_image, write_report  # noqa: E402
from mcq import Record, SplitWriter  # noqa: E402

# The set's file name in QA_information/Open-access -> the split it becomes.
SETS = {"Chest CT Scan": "chest_ct", "ISIC2020": "isic2020", "Retinal OCT-C8": "oct_c8",
        "Diabetic Retinopathy": "diabetic_retinopathy"}
OPTION_KEYS = ["option_A", "option_B", "option_C", "option_D"]
HOW_TO_GET = """Download OmniMedVQA.zip from https://huggingface.co/datasets/foreverbeliever/OmniMedVQA (open access), e.g.
    huggingface-cli download foreverbeliever/OmniMedVQA OmniMedVQA.zip --repo-type dataset --local-dir ~/datasets
    unzip ~/datasets/OmniMedVQA.zip -d ~/datasets
and pass the folder that holds QA_information/ and Images/: --root ~/datasets/OmniMedVQA"""


def main(argv=None) -> dict:
    args = parse_args(argv)
    qa_dir = os.path.join(args.root, "QA_information", "Open-access")
    require(qa_dir, "OmniMedVQA's QA_information/Open-access folder", HOW_TO_GET)
    for name in args.sets:
        require(os.path.join(qa_dir, f"{name}.json"), f"OmniMedVQA set {name!r}", HOW_TO_GET)

    writer = SplitWriter(args.out)
    for name in args.sets:
        with open(os.path.join(qa_dir, f"{name}.json")) as f:
            items = json.load(f)
        for position, item in enumerate(items):
            record = to_record(item, name, position, args.root, writer)
            if record is not None:
                writer.add(SETS[name], record)
    return write_report(writer, Counter(), sets={name: SETS[name] for name in args.sets})


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the OmniMedVQA folder (holds QA_information/ and Images/)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepared"))
    p.add_argument("--sets", nargs="+", default=list(SETS), metavar="SET",
                   help=f"set names or slugs, default all: {', '.join(f'{n!r} ({s})' for n, s in SETS.items())}")
    args = p.parse_args(argv)
    by_slug = {slug: name for name, slug in SETS.items()}
    unknown = [s for s in args.sets if s not in SETS and s not in by_slug]
    if unknown:
        p.error(f"unknown set(s) {unknown}; choose from {list(SETS)} or {list(by_slug)}")
    args.sets = [by_slug.get(s, s) for s in args.sets]
    return args


def to_record(item: dict, name: str, position: int, root: str, writer: SplitWriter) -> Record | None:
    """The item as a Record with its image copied into the prepared folder; None when gt_answer is not
    one of its options. The writer checks everything else (question, options, image) when it is added."""
    record_id = f"omnimedvqa-{SETS[name]}-{item.get('question_id', position)}"
    options = [str(item[key]) for key in OPTION_KEYS if item.get(key) is not None]
    letter = answer_letter(str(item.get("gt_answer", "")), options)
    if letter is None:
        writer.skip(record_id, NOT_AN_OPTION)
        return None
    source_path = str(item.get("image_path", ""))
    # Keep the source's folders (file names repeat across class folders); drop the common "Images/".
    image = image_path_in(source_path.removeprefix("Images/"))
    if os.path.isfile(os.path.join(root, source_path)):  # a missing image is reported by the writer
        with open(os.path.join(root, source_path), "rb") as f:
            save_image(writer.out_dir, image, f.read())
    return Record(id=record_id, image=image, question=str(item.get("question") or "").strip(), options=options,
                  answer=letter, source=f"omnimedvqa/{name}")


if __name__ == "__main__":
    main()
