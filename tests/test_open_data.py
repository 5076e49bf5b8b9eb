"""A split that mixes open questions with multiple choice, written as the preparers write one (records.SplitWriter,
PNG patches of a real IHC image): inputs.check_split and check_inputs accept it and say how many records of each
kind every split holds, and an open record without its reference answer stops the run, named."""

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from skimage.data import immunohistochemistry

from pathvlm.config import EvalConfig, SFTConfig
from pathvlm.inputs import BadInput, check_inputs, check_split
from pathvlm.records import Record, SplitWriter, load_split

ITEMS = [  # (question, options, answer, alternatives): two closed, then three open
    ("Which stain dominates?", ["brown", "blue", "mixed"], "B", []),
    ("Is the patch mostly brown?", ["yes", "no"], "A", []),
    ("What stains the nuclei blue?", [], "hematoxylin", []),
    ("What marks the antigen?", [], "DAB", ["diaminobenzidine"]),
    ("Which tissue is this?", [], "colon", []),
]


@pytest.fixture(scope="module")
def mixed_split(tmp_path_factory) -> str:
    """split.jsonl: the ITEMS, each with its own 64-px patch of the IHC colon image."""
    out = tmp_path_factory.mktemp("mixed")
    tissue = immunohistochemistry()  # (512, 512, 3) uint8
    os.makedirs(out / "images")
    writer = SplitWriter(str(out))
    for n, (question, options, answer, alternatives) in enumerate(ITEMS):
        image = f"images/{n}.png"
        Image.fromarray(tissue[64 * n:64 * (n + 1), 64 * n:64 * (n + 1)]).save(out / image)
        assert writer.add("split", Record(id=f"mixed-{n}", image=image, question=question, options=options,
                                          answer=answer, alternatives=alternatives))
    writer.write()
    return str(out / "split.jsonl")


def test_check_split_counts_the_kinds(mixed_split):
    assert check_split("data", mixed_split) == {"closed": 2, "open": 3}
    assert [r.kind for r in load_split(mixed_split)] == ["closed", "closed", "open", "open", "open"]


def beside_its_images(mixed_split: str, folder: Path, records: list[dict]) -> str:
    """`records` as split.jsonl in `folder`, with a copy of the mixed split's images."""
    shutil.copytree(os.path.join(os.path.dirname(mixed_split), "images"), folder / "images")
    (folder / "split.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder / "split.jsonl")


def test_check_inputs_prints_and_returns_each_splits_kinds(mixed_split, tmp_path, capsys, monkeypatch):
    records = [json.loads(line) for line in Path(mixed_split).read_text().splitlines()]
    closed_only = beside_its_images(mixed_split, tmp_path, [r for r in records if r["options"]])
    for record in records[:2]:  # held out: images the training split does not hold (inputs.check_heldout_apart)
        with Image.open(tmp_path / record["image"]) as image:
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / record["image"])

    cfg = SFTConfig(data=mixed_split, eval_data=closed_only, output_dir=str(tmp_path / "run"))
    assert check_inputs(cfg) == {"data": {"closed": 2, "open": 3}, "eval_data": {"closed": 2, "open": 0}}
    assert capsys.readouterr().out.splitlines() == [f"key 'data': {mixed_split}: 5 records, closed 2, open 3",
                                                    f"key 'eval_data': {closed_only}: 2 records, closed 2, open 0"]

    cfg = EvalConfig(sets=[f"mixed={mixed_split}"], output_dir=str(tmp_path / "eval"))
    assert check_inputs(cfg) == {"sets (mixed)": {"closed": 2, "open": 3}}
    assert f"key 'sets (mixed)': {mixed_split}: 5 records, closed 2, open 3" in capsys.readouterr().out

    monkeypatch.setenv("RANK", "1")  # under torchrun only the first process prints the summary
    assert check_inputs(cfg) == {"sets (mixed)": {"closed": 2, "open": 3}}
    assert capsys.readouterr().out == ""


def test_an_open_record_without_its_answer_stops_check_split(mixed_split, tmp_path):
    records = [json.loads(line) for line in Path(mixed_split).read_text().splitlines()]
    records[3]["answer"] = "  "  # SplitWriter would have dropped it: written by hand
    broken = beside_its_images(mixed_split, tmp_path, records)
    with pytest.raises(BadInput, match=r"key 'data': .*split\.jsonl: 1 of 5 records cannot be used \('mixed-3': "
                                       r"empty answer: an open question"):
        check_split("data", broken)
