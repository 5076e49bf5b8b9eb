"""The three dataset preparers on small fixtures written in the real formats (see each script's docstring):
PathMMU's data.json + images.zip, OmniMedVQA's QA_information/Open-access/*.json + Images/ (or the zip),
PathVQA's parquet shards (yes/no and open questions, prepared by --kind). Each fixture holds one broken record
of every kind; the tests check exact counts, the report's skipped ids and reasons, and that the output loads
with records.load_split and datasets. Then: no image in two splits (PathMMU's deal, the demo's patches), and bad
inputs run as real commands, each stopping with a message that names the file."""

import hashlib
import io
import itertools
import json
import os
import random
import subprocess
import sys
import zipfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.omnimedvqa import prepare as omnimedvqa
from data.pathmmu import prepare as pathmmu
from data.pathvqa import prepare as pathvqa
from pathvlm.records import LETTERS, load_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


GARBAGE = b"this is not an image"


def skipped_reasons(report: dict) -> dict:
    return {s["id"]: s["reason"].split(":")[0] for s in report["skipped_records"]}


def load_everywhere(out_dir: str, splits: list[str], cache_dir) -> dict:
    """Each split through records.load_split and datasets.load_dataset('json'); they must agree."""
    import datasets

    files = {split: os.path.join(out_dir, f"{split}.jsonl") for split in splits}
    loaded = datasets.load_dataset("json", data_files=files, cache_dir=str(cache_dir))
    records = {}
    for split, path in files.items():
        records[split] = load_split(path)
        assert list(loaded[split]["id"]) == [r.id for r in records[split]]
        assert list(loaded[split]["answer"]) == [r.answer for r in records[split]]
        for r in records[split]:
            assert os.path.isfile(os.path.join(out_dir, r.image)), r.image
    return records


# ----------------------------------------------------------------------------------------------
# PathMMU

def hashed_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest() + ".jpg"  # real names are sha256 hex + .jpg


def mmu_item(no, uid, img, n_options=4, answer=None, question=None) -> dict:
    options = [f"{LETTERS[k]}) finding {k} of item {uid}" for k in range(n_options)]
    return {"No": no, "img": img, "question": f"What does the image of item {uid} show?" if question is None else question,
            "options": options, "answer": answer or options[uid % n_options], "explanation": f"Item {uid}."}


TWIN = hashed_name("a copy of image 3")  # a second file name for image 3's bytes


@pytest.fixture(scope="module")
def mmu_files(tmp_path_factory):
    return build_mmu_files(tmp_path_factory.mktemp("pathmmu"))


def build_mmu_files(root) -> dict:
    """40 valid PubMed/EduContent items, 2 test_tiny repeats of test items, 6 broken items, and 7 items of
    the subsets the paper leaves out. Two questions share each image, as in PathMMU (image 2 has three), and
    one question shows image 3 under a second file name, TWIN, with identical bytes: 21 images by content."""
    zip_images, expected, uid = {}, {}, 0

    def expect(item, uid):  # the letter and plain option texts the record must end up with
        expected[item["question"]] = (LETTERS[uid % 4], [f"finding {k} of item {uid}" for k in range(4)])
        return item

    def valid(no):
        nonlocal uid
        uid += 1
        img = hashed_name(f"image {uid // 2}")
        zip_images[img] = image_bytes(uid // 2)
        return expect(mmu_item(no, uid, img), uid)

    pubmed_test = [valid(no) for no in range(1, 16)]
    zip_images[hashed_name("garbage")] = GARBAGE
    pubmed_test += [
        mmu_item(16, 900, hashed_name("not in the zip")),
        mmu_item(17, 901, hashed_name("garbage")),
        mmu_item(18, 902, hashed_name("image 1"), answer="E) a finding no option names"),
        mmu_item(19, 903, hashed_name("image 1"), n_options=1),
        mmu_item(20, 904, hashed_name("image 1"), question="   "),
        # The id of No 1 again: whichever of the two the seed deals first is kept.
        expect(mmu_item(1, 905, hashed_name("image 2")), 905),
    ]
    repeats = [{**pubmed_test[0], "No": 101}, {**pubmed_test[1], "No": 102}]
    edu = {"val": [valid(no) for no in range(1, 5)], "test": [valid(no) for no in range(1, 13)],
           "test_tiny": [valid(no) for no in range(1, 3)]}
    edu["test"][0]["img"] = "./images/" + edu["test"][0]["img"]  # the form some copies of data.json use
    edu["val"][0]["img"] = TWIN  # its own image keeps the other question about it
    zip_images[TWIN] = zip_images[hashed_name("image 3")]
    data = {
        "PubMed": {"val": [valid(no) for no in range(1, 6)], "test": pubmed_test,
                   "test_tiny": repeats + [valid(no) for no in (201, 202)]},
        "EduContent": edu,
        "SocialPath": {"test": [{**mmu_item(n, 950 + n, hashed_name(f"image {n}")), "tw_id": "1045452664673316865",
                                 "img_position": 2, "ref_web": "https://x.com/abc/status/1"} for n in range(1, 4)]},
        "Atlas": {"val": [{**mmu_item(n, 960 + n, hashed_name(f"image {n}")), "source_img": "books_set/images/x.png"}
                          for n in range(1, 3)]},
        "PathCLS": {"test": [mmu_item(n, 970 + n, hashed_name(f"image {n}")) for n in range(1, 3)]},
    }
    (root / "data.json").write_text(json.dumps(data))
    with zipfile.ZipFile(root / "images.zip", "w") as z:
        for name, payload in zip_images.items():
            z.writestr(f"images/{name}", payload)
    return {"data_json": str(root / "data.json"), "zip": str(root / "images.zip"), "expected": expected}


def run_pathmmu(files, out, *extra) -> dict:
    """The preparer on the fixture; val 3 unless given (the default, 150 of a paper-sized test, is 1 here, and
    the fixture's test images have two or three questions each: nothing would be carved)."""
    val = [] if "--val-size" in extra else ["--val-size", "3"]
    return pathmmu.main(["--data-json", files["data_json"], "--images", files["zip"], "--out", str(out), *val, *extra])


def split_ids(out) -> dict:
    return {s: [r.id for r in load_split(os.path.join(out, f"{s}.jsonl"))] for s in ("sft", "rl", "test", "val")}


def test_split_sizes_follow_the_paper_and_scale_down_proportionally():
    assert pathmmu.split_sizes(5385, 3000, 1000) == {"sft": 3000, "rl": 1000, "test": 1385}
    assert pathmmu.split_sizes(6000, 3000, 1000) == {"sft": 3000, "rl": 1000, "test": 2000}
    # 27 * 3000 / 5385 = 15.04, 27 * 1000 / 5385 = 5.01
    assert pathmmu.split_sizes(27, 3000, 1000) == {"sft": 15, "rl": 5, "test": 7}
    assert pathmmu.split_sizes(46, 10, 5) == {"sft": 10, "rl": 5, "test": 31}


def test_pathmmu_counts_and_report(mmu_files, tmp_path):
    report = run_pathmmu(mmu_files, tmp_path / "out")
    # 46 pooled items: 46 * 3000 / 5385 = 25.6 -> 26 sft, 46 * 1000 / 5385 = 8.5 -> 9 rl; the 6 broken
    # take no slot. Whole images are dealt: with seed 0 the last image that fits rl leaves it one short,
    # so test holds the other 40 - 34 = 6. val (--val-size 3, run_pathmmu's) takes 2 of them: whole images.
    assert report["planned_sizes"] == {"sft": 26, "rl": 9, "test": 8, "val": 3}
    assert report["counts"] == {"sft": 26, "rl": 8, "test": 4, "val": 2}
    assert (report["split_by"], report["images"], report["images_merged_by_content"]) == ("image", 21, 1)
    assert report["images_in_several_splits"] == 0
    assert skipped_reasons(report) == {
        "pathmmu-PubMed-test-16": "image missing", "pathmmu-PubMed-test-17": "image unreadable",
        "pathmmu-PubMed-test-18": "answer not among the options",
        "pathmmu-PubMed-test-19": "fewer than two options", "pathmmu-PubMed-test-20": "empty question",
        "pathmmu-PubMed-test-1": "duplicate id"}
    assert report["skipped"] == 6
    not_an_option = [r["reason"] for r in report["skipped_records"] if r["id"] == "pathmmu-PubMed-test-18"]
    assert "'a finding no option names'" in not_an_option[0]  # the offending answer, quoted
    assert report["filtered_by_reason"] == {
        "repeat of an earlier item (same image and question)": 2, "subset SocialPath not used": 3,
        "subset Atlas not used": 2, "subset PathCLS not used": 2}
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["counts"] == report["counts"] and saved["filtered"] == 9


def test_pathmmu_keeps_pubmed_and_educontent_with_plain_options_and_letters(mmu_files, tmp_path):
    run_pathmmu(mmu_files, tmp_path / "out")
    records = load_everywhere(str(tmp_path / "out"), ["sft", "rl", "test", "val"], tmp_path / "cache")
    everything = [r for split in records.values() for r in split]
    assert len(everything) == 40
    assert {r.source.split("/")[1] for r in everything} == {"PubMed", "EduContent"}
    for r in everything:
        letter, options = mmu_files["expected"][r.question]
        assert (r.answer, r.options) == (letter, options)
        assert r.explanation.startswith("Item ")
    assert {r.answer for r in everything} == set("ABCD")


def test_pathmmu_splits_are_deterministic_for_a_seed(mmu_files, tmp_path):
    run_pathmmu(mmu_files, tmp_path / "a", "--seed", "0")
    run_pathmmu(mmu_files, tmp_path / "b", "--seed", "0")
    run_pathmmu(mmu_files, tmp_path / "c", "--seed", "1")
    a, b, c = (split_ids(tmp_path / name) for name in "abc")
    assert a == b
    assert set(a["sft"]) != set(c["sft"])
    assert sorted(sum(a.values(), [])) == sorted(sum(c.values(), []))  # same items, dealt differently


def test_pathmmu_reads_an_extracted_images_folder_like_the_zip(mmu_files, tmp_path):
    with zipfile.ZipFile(mmu_files["zip"]) as z:
        z.extractall(tmp_path / "extracted")
    run_pathmmu(mmu_files, tmp_path / "from_zip")
    report = pathmmu.main(["--data-json", mmu_files["data_json"], "--images", str(tmp_path / "extracted"),
                           "--out", str(tmp_path / "from_folder"), "--val-size", "3"])
    assert split_ids(tmp_path / "from_folder") == split_ids(tmp_path / "from_zip")
    assert report["skipped"] == 6


@pytest.mark.parametrize("split_by", ["image", "question"])
def test_pathmmu_val_is_carved_out_of_test_by_image(mmu_files, tmp_path, split_by):
    """val takes whole images out of test: sft and rl keep the paper's sizes and hold what they hold without val,
    and val shares no image, by content, with any other split."""
    with_val = run_pathmmu(mmu_files, tmp_path / "val", "--split-by", split_by, "--val-size", "3")
    without = run_pathmmu(mmu_files, tmp_path / "none", "--split-by", split_by, "--val-size", "0")
    assert "val" not in without["counts"] and without["empty_splits"] == []
    ids, before = split_ids(tmp_path / "val"), prepared_splits(tmp_path / "none")
    assert ids["sft"] == [r.id for r in before["sft"]] and ids["rl"] == [r.id for r in before["rl"]]
    assert sorted(ids["test"] + ids["val"]) == sorted(r.id for r in before["test"])
    assert 1 <= with_val["counts"]["val"] <= 3  # whole images: 3 or a few under
    hashes = image_hashes(tmp_path / "val")
    if split_by == "image":  # the per-question deal puts an image's questions in several splits by design
        assert all(not hashes["val"] & hashes[split] for split in ("sft", "rl", "test"))


def test_pathmmu_size_flags(mmu_files, tmp_path):
    report = run_pathmmu(mmu_files, tmp_path / "out", "--sft-size", "10", "--rl-size", "5")
    # sft and rl as asked; val (25 left for test * 150 / 1385 = 2.7 -> 3 planned) comes out of test alone
    assert report["counts"]["sft"] == 10 and report["counts"]["rl"] == 5
    assert report["counts"]["test"] + report["counts"].get("val", 0) == 25


def prepared_splits(out) -> dict:
    """split -> its records, for sft, rl, test and (where written) val."""
    return {split: load_split(os.path.join(out, f"{split}.jsonl")) for split in ("sft", "rl", "test", "val")
            if os.path.isfile(os.path.join(out, f"{split}.jsonl"))}


def image_hashes(out) -> dict:
    """split -> the content hashes of its records' images."""
    return {split: {hashlib.sha256((out / r.image).read_bytes()).hexdigest() for r in records}
            for split, records in prepared_splits(out).items()}


@pytest.mark.parametrize("seed", ["0", "1", "2"])
def test_pathmmu_deals_whole_images(mmu_files, tmp_path, seed):
    """No image, by content, in two splits: not the three questions of image 3 (two under TWIN's name,
    identical bytes), not image 2's three. The old deal does put images in two splits on this fixture."""
    report = run_pathmmu(mmu_files, tmp_path / "out", "--seed", seed)
    hashes = image_hashes(tmp_path / "out")
    assert all(not hashes[a] & hashes[b] for a, b in itertools.combinations(hashes, 2))
    assert report["images_merged_by_content"] == 1 and report["images_in_several_splits"] == 0
    records = {r.question: split for split, rs in prepared_splits(tmp_path / "out").items() for r in rs}
    image_3 = [records[f"What does the image of item {uid} show?"] for uid in (6, 7, 16)]  # 16 shows TWIN
    assert len(set(image_3)) == 1
    # sft (val carved out of it) and rl within a question or two of their planned sizes; test the rest
    planned, counts = report["planned_sizes"], report["counts"]
    assert 0 <= planned["sft"] + planned["val"] - counts["sft"] - counts["val"] <= 2
    assert 0 <= planned["rl"] - counts["rl"] <= 2 and 0 <= planned["val"] - counts["val"] <= 2
    assert sum(report["counts"].values()) == 40

    old = run_pathmmu(mmu_files, tmp_path / "old", "--seed", seed, "--split-by", "question")
    assert old["images_in_several_splits"] > 0


@pytest.mark.parametrize("seed, sizes", [("0", []), ("3", ["--sft-size", "10", "--rl-size", "5"])])
def test_pathmmu_split_by_question_is_the_old_deal(mmu_files, tmp_path, seed, sizes):
    """--split-by question deals as before image-disjoint splits: the pooled items in the seed's order, the
    broken ones (and the later of two with one id) left out, the first planned-sft to sft, the next
    planned-rl to rl, the rest to test. Checked against the same rule written out here."""
    report = run_pathmmu(mmu_files, tmp_path / "out", "--seed", seed, "--split-by", "question", *sizes)
    with open(mmu_files["data_json"]) as f:
        items = pathmmu.pooled_items(json.load(f), pathmmu.PAPER_SUBSETS, Counter())
    random.Random(int(seed)).shuffle(items)
    broken = {i for i, reason in skipped_reasons(report).items() if reason != "duplicate id"}
    dealt = [i for i in dict.fromkeys(item["id"] for item in items) if i not in broken]
    # val is carved out of what the old deal gives test
    n_sft, n_rl = report["planned_sizes"]["sft"], report["planned_sizes"]["rl"]
    ids = split_ids(tmp_path / "out")
    assert (ids["sft"], ids["rl"]) == (dealt[:n_sft], dealt[n_sft:n_sft + n_rl])
    assert sorted(ids["test"] + ids["val"], key=dealt.index) == dealt[n_sft + n_rl:]
    assert report["split_by"] == "question"


def test_pathmmu_rerun_removes_a_split_it_no_longer_writes(mmu_files, tmp_path):
    run_pathmmu(mmu_files, tmp_path / "out")
    # rl 0: 46 * 40 / 53.8 = 34 sft, the rest test, no rl.jsonl this time
    report = run_pathmmu(mmu_files, tmp_path / "out", "--sft-size", "40", "--rl-size", "0")
    assert report["removed_stale_splits"] == ["rl.jsonl"]
    assert sorted(os.listdir(tmp_path / "out")) == ["images", "report.json", "sft.jsonl", "test.jsonl", "val.jsonl"]


# ----------------------------------------------------------------------------------------------
# OmniMedVQA

def omni_item(dataset, qid, image_path, question, gt, options) -> dict:
    item = {"dataset": dataset, "question_id": qid, "question_type": "Disease Diagnosis", "question": question,
            "gt_answer": gt, "image_path": image_path, "modality_type": "CT"}
    item.update({f"option_{LETTERS[k]}": text for k, text in enumerate(options)})
    return item


@pytest.fixture(scope="module")
def omni_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets") / "OmniMedVQA"  # as unzip makes it, in the folder above
    qa_dir = root / "QA_information" / "Open-access"
    qa_dir.mkdir(parents=True)

    def image(rel, payload):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(payload)
        return rel

    # The same file name in two class folders, as in the release.
    ct_a = image("Images/Chest CT Scan/test/adenocarcinoma/000139 (9).png", image_bytes(1, "PNG"))
    ct_b = image("Images/Chest CT Scan/test/normal/000139 (9).png", image_bytes(2, "PNG"))
    modality = "What imaging technique is employed for obtaining this image?"
    sets = {
        "Chest CT Scan": [
            omni_item("Chest CT Scan", "ct_0", ct_a, modality, "CT", ["Mammogram", "PET", "CT", "Fluoroscopy"]),
            omni_item("Chest CT Scan", "ct_1", ct_b, modality, "Mammogram", ["Mammogram", "PET", "CT", "MR"]),
            omni_item("Chest CT Scan", "ct_2", ct_a, "Is this normal?", "No, it's normal.",
                      ["Adenocarcinoma", "No, it's normal."]),
            omni_item("Chest CT Scan", "ct_3", ct_b, "Which finding?", "Large cell carcinoma",
                      ["Squamous cell carcinoma", "Large cell carcinoma", "Normal"]),
            omni_item("Chest CT Scan", "ct_4", ct_a, modality, "X-ray", ["Mammogram", "PET", "CT"]),
            omni_item("Chest CT Scan", "ct_5", ct_a, modality, "CT", ["CT"]),
            omni_item("Chest CT Scan", "ct_6", "Images/Chest CT Scan/test/normal/absent.png", modality, "CT",
                      ["CT", "MR"]),
            omni_item("Chest CT Scan", "ct_7", ct_b, "", "CT", ["CT", "MR"]),
            omni_item("Chest CT Scan", "ct_8", None, modality, "CT", ["CT", "MR"]),
        ],
        "ISIC2020": [
            omni_item("ISIC2020", f"isic_{n}", image(f"Images/ISIC2020/ISIC_{n}.jpg", image_bytes(10 + n)),
                      "What is the diagnosis?", "Melanoma", ["Benign", "Melanoma"]) for n in range(3)
        ] + [
            omni_item("ISIC2020", "isic_3", image("Images/ISIC2020/ISIC_3.jpg", GARBAGE), "What is the diagnosis?",
                      "Benign", ["Benign", "Melanoma"]),
            omni_item("ISIC2020", "isic_0", image("Images/ISIC2020/ISIC_4.jpg", image_bytes(20)),
                      "What is the diagnosis?", "Benign", ["Benign", "Melanoma"]),
        ],
        "Retinal OCT-C8": [omni_item("Retinal OCT-C8", f"oct_{n}", image(f"Images/Retinal OCT-C8/AMD/{n}.jpg",
                                     image_bytes(30 + n)), "Which disease?", "AMD", ["DME", "AMD", "CNV", "Normal"])
                           for n in range(2)],
        "Diabetic Retinopathy": [omni_item("Diabetic Retinopathy", f"dr_{n}", image(f"Images/Diabetic Retinopathy/{n}.png",
                                           image_bytes(40 + n, "PNG")), "Grade?", "Moderate", ["Mild", "Moderate", "Severe"])
                                 for n in range(2)],
        "ACRIMA": [omni_item("ACRIMA", "acrima_0", ct_a, "Glaucoma?", "Yes", ["Yes", "No"])],  # not one of ours
    }
    for name, items in sets.items():
        (qa_dir / f"{name}.json").write_text(json.dumps(items, indent=2))
    return str(root)


def test_omnimedvqa_one_split_per_set(omni_root, tmp_path):
    report = omnimedvqa.main(["--root", omni_root, "--out", str(tmp_path / "out")])
    assert report["counts"] == {"chest_ct": 4, "isic2020": 3, "oct_c8": 2, "diabetic_retinopathy": 2}
    assert "'X-ray'" in [r["reason"] for r in report["skipped_records"] if r["id"].endswith("ct_4")][0]
    assert skipped_reasons(report) == {
        "omnimedvqa-chest_ct-ct_4": "answer not among the options",
        "omnimedvqa-chest_ct-ct_5": "fewer than two options", "omnimedvqa-chest_ct-ct_6": "image missing",
        "omnimedvqa-chest_ct-ct_7": "empty question", "omnimedvqa-chest_ct-ct_8": "no image named",
        "omnimedvqa-isic2020-isic_3": "image unreadable",
        "omnimedvqa-isic2020-isic_0": "duplicate id"}
    records = load_everywhere(str(tmp_path / "out"), list(report["counts"]), tmp_path / "cache")
    chest = {r.id: r for r in records["chest_ct"]}
    assert [chest[f"omnimedvqa-chest_ct-ct_{n}"].answer for n in range(4)] == ["C", "A", "B", "B"]
    assert chest["omnimedvqa-chest_ct-ct_2"].options == ["Adenocarcinoma", "No, it's normal."]
    # Same file name, two class folders: two different files in the output.
    assert chest["omnimedvqa-chest_ct-ct_0"].image != chest["omnimedvqa-chest_ct-ct_1"].image
    assert {r.answer for r in records["isic2020"]} == {"B"}
    assert not any(r.source.endswith("ACRIMA") for split in records.values() for r in split)


def test_omnimedvqa_sets_flag_takes_names_or_slugs(omni_root, tmp_path):
    report = omnimedvqa.main(["--root", omni_root, "--out", str(tmp_path / "out"), "--sets", "oct_c8", "ISIC2020"])
    assert report["counts"] == {"oct_c8": 2, "isic2020": 3}
    assert sorted(os.listdir(tmp_path / "out")) == ["images", "isic2020.jsonl", "oct_c8.jsonl", "report.json"]


def test_omnimedvqa_rerun_with_fewer_sets_leaves_no_stale_split(omni_root, tmp_path):
    omnimedvqa.main(["--root", omni_root, "--out", str(tmp_path / "out")])
    report = omnimedvqa.main(["--root", omni_root, "--out", str(tmp_path / "out"), "--sets", "oct_c8"])
    assert report["removed_stale_splits"] == ["chest_ct.jsonl", "isic2020.jsonl", "diabetic_retinopathy.jsonl"]
    assert sorted(os.listdir(tmp_path / "out")) == ["images", "oct_c8.jsonl", "report.json"]


def zip_folder(folder, zip_path, prefix: str):
    """The folder's files in a zip, under `prefix` (as OmniMedVQA.zip holds OmniMedVQA/...)."""
    with zipfile.ZipFile(zip_path, "w") as z:
        for directory, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(directory, name)
                z.write(path, prefix + os.path.relpath(path, folder).replace(os.sep, "/"))
    return str(zip_path)


def test_omnimedvqa_reads_the_downloaded_zip_in_place(omni_root, tmp_path):
    from_folder = omnimedvqa.main(["--root", omni_root, "--out", str(tmp_path / "from_folder")])
    omni_zip = zip_folder(omni_root, tmp_path / "OmniMedVQA.zip", "OmniMedVQA/")
    from_zip = omnimedvqa.main(["--root", omni_zip, "--out", str(tmp_path / "from_zip")])
    assert from_zip["counts"] == from_folder["counts"]
    assert from_zip["skipped_records"] == from_folder["skipped_records"]
    for split in from_zip["counts"]:
        assert (tmp_path / "from_zip" / f"{split}.jsonl").read_text() == \
            (tmp_path / "from_folder" / f"{split}.jsonl").read_text()
        for r in load_split(str(tmp_path / "from_zip" / f"{split}.jsonl")):
            assert (tmp_path / "from_zip" / r.image).read_bytes() == (tmp_path / "from_folder" / r.image).read_bytes()


# ----------------------------------------------------------------------------------------------
# PathVQA

PARQUET_SCHEMA = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                            ("question", pa.string()), ("answer", pa.string())])


def write_parquet(path, rows):
    rows = [{"image": {"bytes": payload, "path": None}, "question": q, "answer": a} for payload, q, a in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), path)


@pytest.fixture(scope="module")
def pathvqa_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("path-vqa") / "data"
    data.mkdir()
    img1, img2, img3 = image_bytes(1), image_bytes(2), image_bytes(3)
    write_parquet(data / "test-00000-of-00002-6f0a.parquet", [
        (img1, "Is there necrosis?", "yes"),                       # row 0
        (img1, "Are the nuclei enlarged?", "No"),                  # row 1, same image
        (img1, "What is present?", "adenocarcinoma"),              # row 2, open
        (img2, "Is this a lymph node?", " YES "),                  # row 3
        (GARBAGE, "Is this the liver?", "yes"),                    # row 4, unreadable
        (img2, "Where is this from?", "lung"),                     # row 5, open
    ])
    write_parquet(data / "test-00001-of-00002-9c1b.parquet", [
        (img3, "Is fibrosis seen?", "no"),                         # row 6
        (None, "Is there inflammation?", "yes"),                   # row 7, no image bytes
        (img3, "", "yes"),                                         # row 8, empty question
        (img3, "How many nuclei are there?", "2"),                 # row 9, open
        (img2, "Is this malignant?", "no"),                        # row 10
        (img3, "Where are the granulomas?", "  in the lung "),     # row 11, open
        (img2, "What is shown?", ""),                              # row 12, empty answer
        (img1, "What is seen?", None),                             # row 13, no answer at all
        (GARBAGE, "What is present?", "granulomas"),               # row 14, open, unreadable
        (img3, "   ", "fibrosis"),                                 # row 15, open, empty question
    ])
    write_parquet(data / "train-00000-of-00001-1d2e.parquet", [(img1, "Is this train?", "yes")])
    return str(data)


# What the fixture holds, by kind: closed rows 0 1 3 6 10 usable, 4 7 8 broken; open rows 2 5 9 11 usable,
# 14 15 broken; rows 12 and 13 have no answer, so they are broken whatever --kind asks for.
NO_ANSWER = {"pathvqa-test-00012": "empty answer", "pathvqa-test-00013": "empty answer"}
CLOSED_BROKEN = {"pathvqa-test-00004": "image unreadable", "pathvqa-test-00007": "image missing",
                 "pathvqa-test-00008": "empty question"}
OPEN_BROKEN = {"pathvqa-test-00014": "image unreadable", "pathvqa-test-00015": "empty question"}
CLOSED_ANSWERS = {"pathvqa-test-00000": "A", "pathvqa-test-00001": "B", "pathvqa-test-00003": "A",
                  "pathvqa-test-00006": "B", "pathvqa-test-00010": "B"}
OPEN_ANSWERS = {"pathvqa-test-00002": "adenocarcinoma", "pathvqa-test-00005": "lung", "pathvqa-test-00009": "2",
                "pathvqa-test-00011": "in the lung"}


def test_pathvqa_keeps_yes_no_questions(pathvqa_dir, tmp_path, capsys):
    out = tmp_path / "out"
    report = pathvqa.main(["--parquet", pathvqa_dir, "--split", "test", "--out", str(out)])  # --kind closed
    assert report["counts"] == {"test": 5}
    assert (report["kind"], report["kinds"]) == ("closed", {"closed": 5, "open": 0})
    assert report["filtered_by_reason"] == {"open question (not yes/no)": 6}
    assert skipped_reasons(report) == {**CLOSED_BROKEN, **NO_ANSWER}
    assert "kinds kept in test: closed 5, open 0 (--kind closed)" in capsys.readouterr().out
    records = load_everywhere(str(out), ["test"], tmp_path / "cache")["test"]
    assert {r.id: r.answer for r in records} == CLOSED_ANSWERS
    assert all(r.options == ["yes", "no"] and r.kind == "closed" for r in records)
    pngs = os.listdir(out / "images")
    assert len(pngs) == 3 and all(name.endswith(".png") for name in pngs)  # three images, each written once
    with Image.open(out / records[0].image) as im:
        assert im.format == "PNG"


def test_pathvqa_keeps_open_questions_with_their_answer_text(pathvqa_dir, tmp_path, capsys):
    out = tmp_path / "out"
    report = pathvqa.main(["--parquet", pathvqa_dir, "--split", "test", "--kind", "open", "--out", str(out)])
    assert report["counts"] == {"test_open": 4}
    assert (report["kind"], report["kinds"]) == ("open", {"closed": 0, "open": 4})
    assert report["filtered_by_reason"] == {"closed question (yes/no)": 8}  # broken ones among them too
    assert skipped_reasons(report) == {**OPEN_BROKEN, **NO_ANSWER}
    assert report["skipped_by_reason"] == {"empty answer": 2, "image unreadable": 1, "empty question": 1}
    assert "kinds kept in test_open: closed 0, open 4 (--kind open)" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["images", "report-test_open.json", "test_open.jsonl"]
    records = load_split(str(out / "test_open.jsonl"))
    assert {r.id: r.answer for r in records} == OPEN_ANSWERS  # "  in the lung " stripped, case as given
    assert all(r.kind == "open" and r.options == [] and r.alternatives == [] for r in records)
    assert {r.question for r in records} >= {"What is present?", "Where are the granulomas?"}


def test_pathvqa_all_keeps_both_kinds_in_one_split(pathvqa_dir, tmp_path, capsys):
    out = tmp_path / "out"
    report = pathvqa.main(["--parquet", pathvqa_dir, "--split", "test", "--kind", "all", "--out", str(out)])
    assert report["counts"] == {"test_all": 9}
    assert report["kinds"] == {"closed": 5, "open": 4}
    assert report["filtered"] == 0 and report["filtered_by_reason"] == {}
    assert skipped_reasons(report) == {**CLOSED_BROKEN, **OPEN_BROKEN, **NO_ANSWER} and report["skipped"] == 7
    saved = json.loads((out / "report-test_all.json").read_text())
    assert saved["kinds"] == report["kinds"] and saved["skipped_records"] == report["skipped_records"]
    assert "kinds kept in test_all: closed 5, open 4 (--kind all)" in capsys.readouterr().out
    # Mixed options ([] beside ["yes", "no"]) read alike by records.load_split and datasets; ids follow the rows
    records = load_everywhere(str(out), ["test_all"], tmp_path / "cache")["test_all"]
    assert {r.id: r.answer for r in records} == {**CLOSED_ANSWERS, **OPEN_ANSWERS}
    assert [r.id for r in records] == sorted(r.id for r in records)  # the rows' order
    assert Counter(r.kind for r in records) == {"closed": 5, "open": 4}
    assert len(os.listdir(out / "images")) == 3  # open and closed questions share the three images


def test_pathvqa_kinds_prepared_into_one_folder_keep_a_file_and_report_each(pathvqa_dir, tmp_path):
    """An open run beside the default closed one leaves test.jsonl (what configs/eval.yaml reads) as it was."""
    out = tmp_path / "out"
    pathvqa.main(["--parquet", pathvqa_dir, "--split", "test", "--out", str(out)])
    closed = (out / "test.jsonl").read_text()
    for kind in ("open", "all"):
        pathvqa.main(["--parquet", pathvqa_dir, "--split", "test", "--kind", kind, "--out", str(out)])
    assert sorted(os.listdir(out)) == ["images", "report-test.json", "report-test_all.json", "report-test_open.json",
                                       "test.jsonl", "test_all.jsonl", "test_open.jsonl"]
    assert (out / "test.jsonl").read_text() == closed


def test_pathvqa_splits_in_one_folder_keep_a_report_each(pathvqa_dir, tmp_path):
    out = tmp_path / "out"
    test = pathvqa.main(["--parquet", pathvqa_dir, "--split", "test", "--out", str(out)])
    train = pathvqa.main(["--parquet", pathvqa_dir, "--split", "train", "--out", str(out)])
    assert sorted(os.listdir(out)) == ["images", "report-test.json", "report-train.json", "test.jsonl", "train.jsonl"]
    assert json.loads((out / "report-test.json").read_text())["counts"] == test["counts"] == {"test": 5}
    assert json.loads((out / "report-train.json").read_text())["counts"] == train["counts"] == {"train": 1}
    # a re-run that keeps no row of the split removes its file from the earlier run
    open_only = tmp_path / "train-00000-of-00001-0000.parquet"
    write_parquet(open_only, [(image_bytes(1), "What is present?", "adenocarcinoma")])
    again = pathvqa.main(["--parquet", str(open_only), "--split", "train", "--out", str(out)])
    assert again["counts"] == {} and again["removed_stale_splits"] == ["train.jsonl"]
    assert "train.jsonl" not in os.listdir(out) and "test.jsonl" in os.listdir(out)


def test_pathvqa_reads_a_single_file(pathvqa_dir, tmp_path):
    shard = os.path.join(pathvqa_dir, "test-00001-of-00002-9c1b.parquet")  # rows 6 to 15, numbered from 0 here
    report = pathvqa.main(["--parquet", shard, "--out", str(tmp_path / "out")])
    assert report["counts"] == {"test": 2} and report["filtered"] == 4 and report["skipped"] == 4
    report = pathvqa.main(["--parquet", shard, "--kind", "all", "--out", str(tmp_path / "out")])
    assert report["kinds"] == {"closed": 2, "open": 2} and report["skipped"] == 6


# ----------------------------------------------------------------------------------------------
# Missing inputs: a message naming what to download, no traceback, nothing written

@pytest.mark.parametrize("module, argv, names", [
    (pathmmu, ["--data-json", "absent/data.json", "--images", "absent/images.zip"],
     ["jamessyx/PathMMU", "data.json", "images.zip", "--data-json"]),
    (omnimedvqa, ["--root", "absent/OmniMedVQA"], ["foreverbeliever/OmniMedVQA", "OmniMedVQA.zip", "--root"]),
    (pathvqa, ["--parquet", "absent/data"], ["flaviagiammarino/path-vqa", "parquet", "--parquet"]),
])
def test_missing_input_says_what_to_download(module, argv, names, tmp_path):
    with pytest.raises(SystemExit) as stop:
        module.main(argv + ["--out", str(tmp_path / "out")])
    message = str(stop.value.code)
    assert message.startswith("error: ") and "not found" in message
    for name in names:
        assert name in message
    assert not (tmp_path / "out").exists()


def test_pathvqa_folder_without_the_split_is_a_clear_error(pathvqa_dir, tmp_path):
    with pytest.raises(SystemExit) as stop:
        pathvqa.main(["--parquet", pathvqa_dir, "--split", "validation", "--out", str(tmp_path / "out")])
    assert "no validation-*.parquet" in str(stop.value.code)
    assert "the splits there are: test, train" in str(stop.value.code)


def test_missing_input_from_the_command_line_exits_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "data/pathmmu/prepare.py", "--data-json", str(tmp_path / "data.json"),
                             "--images", str(tmp_path / "images.zip"), "--out", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "jamessyx/PathMMU" in result.stderr and "images.zip" in result.stderr


def test_image_paths_cannot_leave_the_prepared_folder():
    from data.common import image_path_in

    assert image_path_in("../../etc/x.png") == "images/etc/x.png"
    assert image_path_in("./images/a.jpg") == "images/images/a.jpg"
    assert image_path_in("Chest CT Scan/test/000139 (9).png") == "images/Chest CT Scan/test/000139 (9).png"


# ----------------------------------------------------------------------------------------------
# The demo: its test patches come from held-out blocks; SFT and RL crop the same blocks, and a crop drawn
# twice must not land in both

def test_demo_take_patch_passes_over_a_patch_another_split_holds():
    from data.demo.prepare import take_patch

    a, b, c = (np.full((2, 2, 3), value, dtype=np.uint8) for value in (0, 1, 2))
    pool, split_of = [a, b, a, c], {}
    assert take_patch(pool, 0, "sft", split_of) == 0
    assert take_patch(pool, 1, "rl", split_of) == 1
    assert take_patch(pool, 2, "rl", split_of) == 3  # pool[2] is sft's patch again
    assert take_patch(pool, 2, "sft", split_of) == 2  # a split may repeat its own patch
    assert take_patch(pool, 4, "rl", split_of) is None


def test_demo_default_splits_share_no_patch(tmp_path):
    from data.demo.prepare import main

    main(["--out", str(tmp_path)])
    hashes = image_hashes(tmp_path)
    assert all(not hashes[a] & hashes[b] for a, b in itertools.combinations(hashes, 2))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["counts"] == {"sft": 1500, "rl": 900, "test": 300, "val": 150}
    assert report["patches_in_another_split_passed_over"] == 8  # seed 0: 5 of SFT's crops drawn again for RL, 3 for val


def test_demo_val_leaves_the_other_splits_as_they_were(tmp_path):
    """val is drawn last: sft, rl and test (records, option orders, image bytes) are those of a run without it."""
    from data.demo.prepare import main

    sizes = ["--sft-size", "48", "--rl-size", "24", "--test-size", "24"]
    main(["--out", str(tmp_path / "none"), *sizes, "--val-size", "0"])
    main(["--out", str(tmp_path / "val"), *sizes, "--val-size", "30"])
    assert not (tmp_path / "none" / "val.jsonl").exists()
    for split in ("sft", "rl", "test"):
        assert (tmp_path / "val" / f"{split}.jsonl").read_text() == (tmp_path / "none" / f"{split}.jsonl").read_text()
    val = load_split(str(tmp_path / "val" / "val.jsonl"))
    assert len(val) == 30 and {r.answer_text() for r in val} == {"brown", "blue", "mixed"}  # true labels, 10 each
    assert image_hashes(tmp_path / "none")["test"] == image_hashes(tmp_path / "val")["test"]


# ----------------------------------------------------------------------------------------------
# Bad inputs, run as a user runs them: a message naming the file and what was expected, no traceback

def write_file(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def omni_set_file(tmp_path, text: str) -> str:
    """An OmniMedVQA folder whose Chest CT Scan set file holds `text`; returns the folder."""
    write_file(tmp_path / "OmniMedVQA" / "QA_information" / "Open-access" / "Chest CT Scan.json", text)
    return str(tmp_path / "OmniMedVQA")


# Each case: (script, its arguments, the path the message must name, a phrase of the message). The
# arguments may use {tmp}, {mmu_json}, {mmu_zip}, {omni}, {omni_parent}, {pathvqa}: this test's folder and the
# fixtures above.
BAD_INPUTS = {
    "data.json not JSON": ("pathmmu", ["--data-json", "{tmp}/data.json", "--images", "{mmu_zip}"],
                           "{tmp}/data.json", "is not valid JSON"),
    "data.json a folder": ("pathmmu", ["--data-json", "{tmp}/folder", "--images", "{mmu_zip}"],
                           "{tmp}/folder", "is a folder, expected PathMMU's data.json"),
    "images.zip as data.json": ("pathmmu", ["--data-json", "{mmu_zip}", "--images", "{mmu_zip}"],
                                "{mmu_zip}", "is not valid JSON"),
    "data.json a list": ("pathmmu", ["--data-json", "{tmp}/list.json", "--images", "{mmu_zip}"],
                         "{tmp}/list.json", "the top level is list"),
    "data.json item not an object": ("pathmmu", ["--data-json", "{tmp}/item.json", "--images", "{mmu_zip}"],
                                     "{tmp}/item.json", "PubMed/test[0] is str 'oops'"),
    "images not a zip": ("pathmmu", ["--data-json", "{mmu_json}", "--images", "{tmp}/list.json"],
                         "{tmp}/list.json", "neither a folder nor a readable zip archive"),
    "images folder without the images": ("pathmmu", ["--data-json", "{mmu_json}", "--images", "{tmp}/folder"],
                                         "{tmp}/folder", "none of the images named in"),
    "subset not in data.json": ("pathmmu", ["--data-json", "{mmu_json}", "--images", "{mmu_zip}",
                                            "--subsets", "Pubmed"], "{mmu_json}", "has no subset 'Pubmed'"),
    "omni root one level too high": ("omnimedvqa", ["--root", "{omni_parent}"], "{omni}",
                                     "its subfolder OmniMedVQA/ holds it (one level down)"),
    "omni root QA_information/": ("omnimedvqa", ["--root", "{omni}/QA_information"], "{omni}",
                                  "inside the OmniMedVQA folder"),
    "omni root Open-access/": ("omnimedvqa", ["--root", "{omni}/QA_information/Open-access"], "{omni}",
                               "inside the OmniMedVQA folder"),
    "omni root a zip of something else": ("omnimedvqa", ["--root", "{mmu_zip}"], "{mmu_zip}",
                                          "holds no QA_information/Open-access/ folder"),
    "omni root a plain file": ("omnimedvqa", ["--root", "{tmp}/list.json"], "{tmp}/list.json",
                               "neither a folder nor a readable zip archive"),
    "omni set file not JSON": ("omnimedvqa", ["--root", "{tmp}/OmniMedVQA", "--sets", "chest_ct"],
                               "{tmp}/OmniMedVQA/QA_information/Open-access/Chest CT Scan.json", "is not valid JSON"),
    "pathvqa split absent": ("pathvqa", ["--parquet", "{pathvqa}", "--split", "validation"], "{pathvqa}",
                             "the splits there are: test, train"),
    "pathvqa folder without parquet": ("pathvqa", ["--parquet", "{tmp}/folder"], "{tmp}/folder",
                                       "holds no .parquet file at all"),
    "pathvqa file not parquet": ("pathvqa", ["--parquet", "{tmp}/list.json"], "{tmp}/list.json",
                                 "is not a readable parquet file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_with_a_message_naming_the_file(case, mmu_files, omni_root, pathvqa_dir, tmp_path):
    write_file(tmp_path / "data.json", '{"PubMed": {"test": [')  # cut short
    (tmp_path / "folder").mkdir()
    write_file(tmp_path / "list.json", json.dumps([{"question": "Is this PathMMU?"}]))
    write_file(tmp_path / "item.json", json.dumps({"PubMed": {"test": ["oops"]}}))
    omni_set_file(tmp_path, '[{"question": ')
    script, args, named, phrase = BAD_INPUTS[case]
    places = {"tmp": str(tmp_path), "mmu_json": mmu_files["data_json"], "mmu_zip": mmu_files["zip"],
              "omni": omni_root, "omni_parent": os.path.dirname(omni_root), "pathvqa": pathvqa_dir}
    command = [sys.executable, f"data/{script}/prepare.py", *[a.format(**places) for a in args],
               "--out", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert named.format(**places) in result.stderr and phrase in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
