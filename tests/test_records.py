"""Bad records and bad images, each written as a real file in the real format: every one ends in a message
naming the file, the record and the key (load_split, check_record, inputs.check_split) or in a skip the
preparer counts in report.json, never a traceback and never a silent wrong result. Then: images.open_image turns
an image of every mode into the 8-bit RGB the model sees, and the preparers read images only from inside
the dataset they were given, warn of an empty split, refuse an --out that is a file, and print download
commands the pinned huggingface_hub can run."""

import io
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from data.omnimedvqa import prepare as omnimedvqa
from data.pathmmu import prepare as pathmmu
from data.pathvqa import prepare as pathvqa
from pathvlm.images import MAX_ASPECT_RATIO, open_image, to_rgb
from pathvlm.inputs import BadInput, MissingInput, check_split
from pathvlm.records import Record, check_record, load_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def noise(size=(64, 64), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def encoded(pixels_or_image, fmt: str) -> bytes:
    image = pixels_or_image if isinstance(pixels_or_image, Image.Image) else Image.fromarray(pixels_or_image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_jpeg(seed=0) -> bytes:
    """A JPEG cut in half, as a download cut short leaves it: its header is whole, so Image.verify() passes."""
    data = encoded(noise(seed=seed), "JPEG")
    return data[:len(data) // 2]


def elongated_png() -> bytes:
    return encoded(Image.new("RGB", (5000, 10), (200, 100, 50)), "PNG")  # aspect ratio 500


def sixteen_bit_png() -> bytes:
    """A 12-bit scan stored in a 16-bit PNG (mode I;16): values 0..4095, a left-to-right ramp."""
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (16, 1))
    return encoded(Image.fromarray(ramp), "PNG")


def write(path, data: bytes | str) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return str(path)


def good_record(rid="r0", image="images/ok.png") -> dict:
    return {"id": rid, "image": image, "question": "Which stain dominates?", "options": ["brown", "blue"],
            "answer": "A"}


def split_file(folder, records: list[dict], images: dict | None = None) -> str:
    """A prepared split by hand: split.jsonl with `records`, and images/ok.png plus `images` beside it."""
    write(folder / "images" / "ok.png", encoded(noise(), "PNG"))
    for name, data in (images or {}).items():
        write(folder / name, data)
    return write(folder / "split.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def skipped(report: dict) -> dict:
    return {s["id"]: s["reason"] for s in report["skipped_records"]}


# ----------------------------------------------------------------------------------------------
# Field types: one rule from Record's annotations, a reason naming the key and the type

TYPE_CASES = {  # a record's key -> (bad value, the reason check_record gives)
    "image null": ("image", None, "wrong type: 'image' is null, expected a string"),
    "image an integer": ("image", 7, "wrong type: 'image' is int 7, expected a string"),
    "id a list": ("id", ["r1"], "wrong type: 'id' is list ['r1'], expected a string"),
    "explanation a number": ("explanation", 5, "wrong type: 'explanation' is int 5, expected a string"),
    "options numbers": ("options", [1, 2, 3], "wrong type: 'options' item 0 is int 1, expected a list of strings"),
    "options a string": ("options", "ABCD", "wrong type: 'options' is str 'ABCD', expected a list of strings"),
    "question a mapping": ("question", {"text": "Which?"},
                           "wrong type: 'question' is dict {'text': 'Which?'}, expected a string"),
    "answer an integer": ("answer", 0, "wrong type: 'answer' is int 0, expected a string"),
    "image_facts a list": ("image_facts", ["blue"], "wrong type: 'image_facts' is list ['blue'], expected a mapping "
                                                     'such as {"stain": "blue"}'),
}


@pytest.mark.parametrize("case", list(TYPE_CASES))
def test_a_field_of_the_wrong_type_is_named_by_check_record(case, tmp_path):
    key, value, reason = TYPE_CASES[case]
    write(tmp_path / "images" / "ok.png", encoded(noise(), "PNG"))
    record = Record(**{**good_record("r1"), key: value})
    assert check_record(record, str(tmp_path), set()) == reason


@pytest.mark.parametrize("case", list(TYPE_CASES))
def test_a_field_of_the_wrong_type_is_named_by_load_split_and_check_split(case, tmp_path):
    key, value, reason = TYPE_CASES[case]
    path = split_file(tmp_path, [good_record("r0"), {**good_record("r1"), key: value}])
    named = "record 'r1'" if key != "id" else "record"
    with pytest.raises(ValueError) as error:
        load_split(path)
    assert str(error.value) == f"{path}:2: {named}: {reason}"
    with pytest.raises(BadInput) as error:
        check_split("data", path)
    assert str(error.value) == f"key 'data': {path}:2: {named}: {reason}"


@pytest.mark.parametrize("line, message", [
    ('{"id": "r1", "image": "images/ok.png", "question": "q?", "optons": ["a", "b"], "answer": "A"}',
     "record 'r1': unknown key 'optons' (did you mean 'options'?)"),
    ('{"id": "r1", "image": "images/ok.png", "question": "q?", "options": ["a", "b"]}',
     "record 'r1': missing key 'answer'"),
    ('["r1", "images/ok.png"]', "record: a record is a JSON object {\"id\": ..., \"image\": ..., ...}, got list"),
    ('{"id": "r1", "image": ', "not a valid record ("),  # as before
])
def test_a_line_that_is_not_a_record_is_named(line, message, tmp_path):
    path = split_file(tmp_path, [good_record("r0")])
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError) as error:
        load_split(path)
    assert str(error.value).startswith(f"{path}:2: {message}"), str(error.value)


def test_a_byte_order_mark_is_read_past_and_nul_bytes_are_named(tmp_path):
    """A split saved by a Windows editor starts with a BOM: read as UTF-8-sig it loads as written. A tail of zero
    bytes (what a crash mid-write leaves) is named with its line, not passed to the JSON parser."""
    path = split_file(tmp_path, [good_record("r0"), good_record("r1")])
    text = open(path, encoding="utf-8").read()
    with open(path, "w", encoding="utf-8-sig") as f:
        f.write(text)
    assert [r.id for r in load_split(path)] == ["r0", "r1"]
    with open(path, "ab") as f:
        f.write(b"\0" * 64)
    with pytest.raises(ValueError, match=r":3: NUL bytes in the line: the file is damaged"):
        load_split(path)


def test_an_exif_rotated_photo_is_shown_upright(tmp_path):
    """A phone stores the sensor's pixels and an EXIF Orientation tag: 6 means turn 90 degrees clockwise to view.
    The model must see what a viewer shows: a 40x20 landscape with tag 6 is a 20x40 portrait."""
    image = Image.new("RGB", (40, 20), (200, 40, 40))
    image.paste((40, 40, 200), (0, 0, 20, 20))  # the stored left half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    image.save(path, exif=exif, quality=95)
    shown = open_image(path)
    assert shown.size == (20, 40)
    assert shown.getpixel((10, 5))[2] > 150  # after the turn the blue half is on top


# ----------------------------------------------------------------------------------------------
# Images a record names

def test_a_truncated_jpeg_passes_verify_but_not_check_record(tmp_path):
    write(tmp_path / "images" / "cut.jpg", truncated_jpeg())
    with Image.open(tmp_path / "images" / "cut.jpg") as image:
        image.verify()  # the old check: the header is whole
    reason = check_record(Record(**good_record("r1", "images/cut.jpg")), str(tmp_path), set())
    assert reason.startswith("image unreadable: images/cut.jpg (OSError: image file is truncated"), reason


def test_check_split_names_the_truncated_and_the_elongated_image(tmp_path):
    path = split_file(tmp_path, [good_record("r0"), good_record("r1", "images/cut.jpg"),
                                 good_record("r2", "images/long.png")],
                      {"images/cut.jpg": truncated_jpeg(), "images/long.png": elongated_png()})
    with pytest.raises(BadInput) as error:
        check_split("data", path)
    message = str(error.value)
    assert message.startswith(f"key 'data': {path}: 2 of 3 records cannot be used ('r1': image unreadable: "
                              "images/cut.jpg (OSError: image file is truncated"), message
    assert ("'r2': image too elongated: images/long.png is 5000x10 px, an aspect ratio above 200, which Qwen2.5-VL's "
            "image processor refuses: crop it into parts or pad it") in message


def test_train_sft_stops_on_a_truncated_jpeg_before_training(tmp_path):
    """As a user runs it: the truncated image is named at the start, not met by the loop hours in."""
    path = split_file(tmp_path, [good_record("r0"), good_record("r1", "images/cut.jpg")],
                      {"images/cut.jpg": truncated_jpeg()})
    result = subprocess.run([sys.executable, "train_sft.py", "configs/demo_sft.yaml", f"data={path}", "eval_data=none",
                             f"output_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert (f"error: key 'data': {path}: 1 of 2 records cannot be used ('r1': image unreadable: images/cut.jpg "
            "(OSError: image file is truncated") in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()


def test_the_aspect_ratio_limit_is_the_processors():
    """Qwen2.5-VL's own resize refuses above MAX_ASPECT_RATIO and takes an image at it."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # the torch backend: the same

    assert smart_resize(10, 10 * MAX_ASPECT_RATIO)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 5000)


def test_an_image_outside_the_split_folder_is_noted_once(tmp_path, capsys):
    outside = write(tmp_path / "elsewhere" / "slide.png", encoded(noise(seed=3), "PNG"))
    records = [good_record("r0"), good_record("r1", outside), good_record("r2", "../elsewhere/slide.png")]
    path = split_file(tmp_path / "split", records)
    check_split("data", path)  # allowed: a split written by hand may name its images so
    err = capsys.readouterr().err
    assert err.count("note:") == 1
    assert (f"note: key 'data': 2 of 3 records in {path} name an image outside its folder (absolute, ../ or a "
            f"symlink), e.g. 'r1': {outside}; they are used as named, and an API judge uploads each image a record "
            "names") in err


def test_an_empty_split_names_the_preparers_report(tmp_path):
    path = write(tmp_path / "rl.jsonl", "\n")
    write(tmp_path / "report.json", json.dumps({"counts": {"sft": 3, "test": 2}}))
    with pytest.raises(BadInput, match=re.escape(f"{path}: the split is empty; {tmp_path}/report.json says")):
        check_split("data", path)
    os.remove(path)  # as a preparer leaves an empty split: no file
    with pytest.raises(MissingInput) as error:
        check_split("data", path)
    assert str(error.value) == (
        f"key 'data': data file not found: {path} (the preparation's {tmp_path}/report.json lists the splits it "
        "wrote: sft (3), test (2); a split that comes out empty is not written, so 'rl' was empty or misnamed: see "
        "the report's skipped and filtered records, and the preparer's sizes and subsets)")


# ----------------------------------------------------------------------------------------------
# open_image: every mode to 8-bit RGB, as training, evaluation and the judges see it

def rgb_of(tmp_path, image: Image.Image, fmt: str) -> np.ndarray:
    path = write(tmp_path / f"image.{fmt.lower()}", encoded(image, fmt))
    with Image.open(path) as opened:
        assert opened.mode == image.mode, (opened.mode, image.mode)  # the file holds the mode under test
    rgb = open_image(path)
    assert rgb.mode == "RGB" and rgb.size == image.size
    return np.asarray(rgb).astype(int)


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = write(tmp_path / "scan.png", sixteen_bit_png())
    with Image.open(path) as image:
        assert image.mode == "I;16"
        assert (np.asarray(image.convert("RGB")) == 255).all(-1).mean() > 0.9  # what convert("RGB") made of it
    pixels = np.asarray(open_image(path)).astype(int)
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[0, -1].tolist() == [255, 255, 255]
    assert (np.diff(pixels[0, :, 0]) >= 0).all() and 120 <= pixels[0, 32, 0] <= 135  # the ramp, kept
    assert (pixels == 255).all(-1).mean() < 0.05


@pytest.mark.parametrize("mode, fmt, make, want", [
    # make: the image of that mode; want: {(x, y): the RGB there}
    ("1", "PNG", lambda: Image.fromarray(np.array([[0, 255]] * 2, dtype=np.uint8)).convert("1"),
     {(0, 0): (0, 0, 0), (1, 0): (255, 255, 255)}),
    ("L", "PNG", lambda: Image.new("L", (2, 2), 100), {(0, 0): (100, 100, 100)}),
    ("P", "PNG", lambda: Image.new("RGB", (2, 2), (200, 30, 40)).convert("P", palette=Image.Palette.ADAPTIVE),
     {(0, 0): (200, 30, 40)}),
    ("P", "GIF", lambda: transparent_palette(), {(0, 0): (255, 255, 255), (1, 0): (0, 0, 255)}),
    ("LA", "PNG", lambda: Image.fromarray(np.array([[[50, 255], [0, 0]]], dtype=np.uint8), "LA"),
     {(0, 0): (50, 50, 50), (1, 0): (255, 255, 255)}),
    ("RGBA", "PNG", lambda: Image.fromarray(np.array([[[255, 0, 0, 255], [0, 0, 0, 0]]], dtype=np.uint8), "RGBA"),
     {(0, 0): (255, 0, 0), (1, 0): (255, 255, 255)}),
    ("RGB", "JPEG", lambda: Image.new("RGB", (8, 8), (0, 128, 255)), {(0, 0): (0, 128, 255)}),
    ("CMYK", "TIFF", lambda: Image.new("CMYK", (2, 2), (0, 255, 255, 0)), {(0, 0): (255, 0, 0)}),
    ("I;16", "TIFF", lambda: Image.fromarray(np.array([[0, 65535, 32768]], dtype=np.uint16)),
     {(0, 0): (0, 0, 0), (1, 0): (255, 255, 255), (2, 0): (128, 128, 128)}),
    ("I", "TIFF", lambda: Image.fromarray(np.array([[-1000, 1000, 3000]], dtype=np.int32)),
     {(0, 0): (0, 0, 0), (1, 0): (128, 128, 128), (2, 0): (255, 255, 255)}),
    ("F", "TIFF", lambda: Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)),
     {(0, 0): (0, 0, 0), (1, 0): (128, 128, 128), (2, 0): (255, 255, 255)}),
    ("LAB", "TIFF", lambda: Image.new("LAB", (2, 2), (255, 128, 128)), {(0, 0): (254, 255, 254)}),
])
def test_open_image_gives_8_bit_rgb_for_every_mode(mode, fmt, make, want, tmp_path):
    pixels = rgb_of(tmp_path, make(), fmt)
    for (x, y), rgb in want.items():
        assert np.abs(pixels[y, x] - rgb).max() <= 2, (mode, (x, y), pixels[y, x], rgb)


def transparent_palette() -> Image.Image:
    image = Image.new("P", (2, 2), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # index 0 (black) is transparent: on white, as a slide's background
    return image


@pytest.mark.parametrize("mode, pixel, want", [("PA", (1, 0), (255, 255, 255)), ("La", (90, 255), (90, 90, 90)),
                                               ("RGBa", (0, 0, 0, 0), (255, 255, 255)), ("YCbCr", (76, 85, 255),
                                                                                         (254, 0, 0)),
                                               ("HSV", (0, 255, 255), (255, 0, 0))])
def test_to_rgb_takes_the_modes_no_file_holds(mode, pixel, want):
    """Modes Pillow makes in memory but does not write to PNG/TIFF: to_rgb takes them too."""
    image = Image.new(mode, (2, 2), pixel)
    if mode == "PA":
        image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    rgb = np.asarray(to_rgb(image)).astype(int)
    assert np.abs(rgb[0, 0] - want).max() <= 2, (mode, rgb[0, 0])


def test_every_image_the_model_sees_goes_through_open_image():
    """No script opens an image for the model with its own convert("RGB"), which clips 16-bit pixels."""
    offenders = []
    for folder, _, names in os.walk(REPO):
        if any(part in folder for part in (".venv", "tests", ".git", "runs")):
            continue
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    offenders += [f"{name}: {line.strip()}" for line in f
                                  if "Image.open(" in line and ".convert(" in line]
    assert offenders == []


# ----------------------------------------------------------------------------------------------
# The preparers: images only from inside the dataset, only those that decode, each skip counted

def omni_item(qid: str, image_path: str) -> dict:
    return {"dataset": "Chest CT Scan", "question_id": qid, "question": "Which imaging technique?", "gt_answer": "CT",
            "image_path": image_path, "option_A": "CT", "option_B": "MR"}


@pytest.fixture
def omni_with_bad_images(tmp_path):
    """An OmniMedVQA folder whose Chest CT set names a good image, a 16-bit PNG, a truncated JPEG, an
    elongated PNG, and a valid PNG outside the folder by an absolute path, by ../ and by a symlink."""
    root = tmp_path / "OmniMedVQA"
    secret = write(tmp_path / "private" / "secret.png", encoded(noise(seed=9), "PNG"))
    write(root / "Images" / "ok.png", encoded(noise(seed=1), "PNG"))
    write(root / "Images" / "scan16.png", sixteen_bit_png())
    write(root / "Images" / "cut.jpg", truncated_jpeg())
    write(root / "Images" / "long.png", elongated_png())
    os.symlink(secret, root / "Images" / "link.png")
    items = [omni_item("ok", "Images/ok.png"), omni_item("scan16", "Images/scan16.png"),
             omni_item("cut", "Images/cut.jpg"), omni_item("long", "Images/long.png"),
             omni_item("absolute", secret), omni_item("climb", "../private/secret.png"),
             omni_item("link", "Images/link.png")]
    write(root / "QA_information" / "Open-access" / "Chest CT Scan.json", json.dumps(items))
    return {"root": str(root), "secret": secret}


def test_omnimedvqa_skips_bad_images_and_never_copies_from_outside(omni_with_bad_images, tmp_path):
    out = tmp_path / "out"
    report = omnimedvqa.main(["--root", omni_with_bad_images["root"], "--out", str(out), "--sets", "chest_ct"])
    reasons = skipped(report)
    assert report["counts"] == {"chest_ct": 2} and report["skipped"] == 5
    assert reasons["omnimedvqa-chest_ct-cut"].startswith(
        "image unreadable: Images/cut.jpg (OSError: image file is truncated")
    assert reasons["omnimedvqa-chest_ct-long"].startswith("image too elongated: Images/long.png is 5000x10 px")
    root, secret = omni_with_bad_images["root"], omni_with_bad_images["secret"]
    for qid, path in [("absolute", secret), ("climb", "../private/secret.png"), ("link", "Images/link.png")]:
        assert reasons[f"omnimedvqa-chest_ct-{qid}"] == (
            f"image outside the dataset folder: {path!r} leads out of {root} (to {secret}); nothing was copied: "
            "fix the path, or put the file inside the dataset folder")
    assert report["skipped_by_reason"] == {"image unreadable": 1, "image too elongated": 1,
                                           "image outside the dataset folder": 3}
    copied = sorted(os.path.relpath(os.path.join(d, n), out) for d, _, names in os.walk(out / "images") for n in names)
    assert copied == ["images/ok.png", "images/scan16.png"]  # nothing of the skipped, nothing from outside
    scan = next(r for r in load_split(str(out / "chest_ct.jsonl")) if r.id.endswith("scan16"))
    assert (np.asarray(open_image(out / scan.image)) == 255).all(-1).mean() < 0.05


def test_omnimedvqa_zip_refuses_a_path_that_climbs(tmp_path):
    with zipfile.ZipFile(tmp_path / "OmniMedVQA.zip", "w") as z:
        z.writestr("OmniMedVQA/Images/ok.png", encoded(noise(), "PNG"))
        z.writestr("OmniMedVQA/QA_information/Open-access/Chest CT Scan.json", json.dumps(
            [omni_item("ok", "Images/ok.png"), omni_item("climb", "Images/../../x.png"),
             omni_item("absolute", "/etc/hostname")]))
    report = omnimedvqa.main(["--root", str(tmp_path / "OmniMedVQA.zip"), "--out", str(tmp_path / "out"),
                              "--sets", "chest_ct"])
    assert report["counts"] == {"chest_ct": 1}
    assert report["skipped_by_reason"] == {"image outside the dataset folder": 2}


def mmu_item(no: int, img: str) -> dict:
    options = [f"A) finding {no}", f"B) other {no}"]
    return {"No": no, "img": img, "question": f"What does image {no} show?", "options": options, "answer": options[0]}


def test_pathmmu_skips_a_truncated_image_and_a_symlink_out(tmp_path):
    images = tmp_path / "images"
    for no in range(8):
        write(images / f"{no}.jpg", encoded(noise(seed=no), "JPEG"))
    write(images / "cut.jpg", truncated_jpeg())
    secret = write(tmp_path / "private" / "secret.jpg", encoded(noise(seed=99), "JPEG"))
    os.symlink(secret, images / "link.jpg")
    items = [mmu_item(no, f"{no}.jpg") for no in range(8)] + [mmu_item(8, "cut.jpg"), mmu_item(9, "link.jpg")]
    write(tmp_path / "data.json", json.dumps({"PubMed": {"test": items}, "EduContent": {}}))
    report = pathmmu.main(["--data-json", str(tmp_path / "data.json"), "--images", str(images),
                           "--out", str(tmp_path / "out")])
    assert sum(report["counts"].values()) == 8 and report["skipped"] == 2
    reasons = skipped(report)
    assert reasons["pathmmu-PubMed-test-8"].startswith("image unreadable: cut.jpg (OSError: image file is truncated")
    assert reasons["pathmmu-PubMed-test-9"].startswith(f"image outside the dataset folder: '{images}/link.jpg' leads "
                                                       f"out of {images} (to {secret})")
    assert sorted(os.listdir(tmp_path / "out" / "images")) == [f"{no}.jpg" for no in range(8)]


def test_pathvqa_converts_a_16_bit_png_and_skips_a_truncated_jpeg(tmp_path):
    from test_data_real import write_parquet

    write_parquet(tmp_path / "test-00000-of-00001-0000.parquet", [
        (sixteen_bit_png(), "Is this a scan?", "yes"), (truncated_jpeg(), "Is this cut?", "no"),
        (elongated_png(), "Is this long?", "yes")])
    report = pathvqa.main(["--parquet", str(tmp_path), "--split", "test", "--out", str(tmp_path / "out")])
    assert report["counts"] == {"test": 1}
    assert report["skipped_by_reason"] == {"image unreadable": 1, "image too elongated": 1}
    assert "image file is truncated" in skipped(report)["pathvqa-test-00001"]
    record = load_split(str(tmp_path / "out" / "test.jsonl"))[0]
    with Image.open(tmp_path / "out" / record.image) as image:
        assert image.mode == "RGB" and (np.asarray(image) == 255).all(-1).mean() < 0.05


# ----------------------------------------------------------------------------------------------
# Empty splits, --out, download commands

def test_an_empty_split_is_warned_of_and_load_split_points_at_the_report(omni_with_bad_images, tmp_path, capsys):
    root = omni_with_bad_images["root"]
    write(os.path.join(root, "QA_information", "Open-access", "ISIC2020.json"),
          json.dumps([omni_item("cut", "Images/cut.jpg")]))  # its only item is skipped
    out = tmp_path / "out"
    report = omnimedvqa.main(["--root", root, "--out", str(out), "--sets", "chest_ct", "isic2020"])
    assert report["empty_splits"] == ["isic2020"]
    err = capsys.readouterr().err
    assert (f"warning: split 'isic2020' is empty: no isic2020.jsonl was written, and a run given it will stop. Its set "
            f"file holds no item, or every item was skipped. See {out}/report.json for what was skipped or "
            "filtered.") in err
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"data file not found: {out}/isic2020.jsonl (the preparation's {out}/report.json lists the splits it "
            "wrote: chest_ct (2); a split that comes out empty is not written, so 'isic2020' was empty")):
        load_split(str(out / "isic2020.jsonl"))


def test_pathmmu_warns_of_an_empty_rl_split(tmp_path):
    """As a user runs it: --rl-size 0 leaves rl empty, and stderr says so with what to change."""
    images = {f"{no}.jpg": encoded(noise(seed=no), "JPEG") for no in range(6)}
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        for name, data in images.items():
            z.writestr(f"images/{name}", data)
    items = [mmu_item(no, f"{no}.jpg") for no in range(6)]
    write(tmp_path / "data.json", json.dumps({"PubMed": {"test": items}, "EduContent": {}}))
    result = subprocess.run([sys.executable, "data/pathmmu/prepare.py", "--data-json", str(tmp_path / "data.json"),
                             "--images", str(tmp_path / "images.zip"), "--rl-size", "0",
                             "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert ("warning: split 'rl' is empty: no rl.jsonl was written, and a run given it will stop. The sizes planned "
            "were {'sft': 4, 'rl': 0, 'test': 2, 'val': 0}, of 6 questions in --subsets PubMed EduContent") in result.stderr
    assert "raise --sft-size / --rl-size" in result.stderr


@pytest.mark.parametrize("script, args", [
    ("demo", []), ("pathmmu", ["--data-json", "{tmp}/data.json", "--images", "{tmp}/images.zip"]),
    ("omnimedvqa", ["--root", "{tmp}"]), ("pathvqa", ["--parquet", "{tmp}"])])
@pytest.mark.parametrize("out", ["{tmp}/a_file.txt", "{tmp}/a_file.txt/prepared"])
def test_out_that_is_a_file_is_one_message(script, args, out, tmp_path):
    write(tmp_path / "a_file.txt", "not a folder\n")
    fill = lambda text: text.replace("{tmp}", str(tmp_path))  # noqa: E731
    result = subprocess.run([sys.executable, f"data/{script}/prepare.py", *map(fill, args), "--out", fill(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    where = "is a file" if out.endswith(".txt") else f"is inside {tmp_path}/a_file.txt, which is a file"
    assert result.stderr.strip().splitlines()[-1] == (
        f"prepare.py: error: argument --out: {fill(out)} {where}: give a folder to write the splits and images into")


@pytest.mark.parametrize("module", [pathmmu, omnimedvqa, pathvqa])
def test_download_commands_run_with_the_pinned_hf_cli(module):
    """Each `hf download` line of the docstring and the missing-file hint uses only options `hf download`
    has: huggingface_hub >= 1.0 installs `hf`, not `huggingface-cli`."""
    hf = os.path.join(os.path.dirname(sys.executable), "hf")
    usage = subprocess.run([hf, "download", "--help"], capture_output=True, text=True, timeout=60).stdout
    for text in (module.__doc__, module.HOW_TO_GET):
        assert "huggingface-cli" not in text
        commands = [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip().startswith("hf ")]
        assert commands, text
        for command in commands:
            assert command.startswith("hf download ")
            for option in re.findall(r"\s(--[a-z-]+)", command):
                assert option in usage, (command, option)
