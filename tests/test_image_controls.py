"""eval.py's image-reliance controls (image_controls=[blank, shuffled]): the derangement and the blank
images checked directly, then eval end to end on the tiny real model, resumed."""

import json
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from pathvlm.config import ConfigError, EvalConfig, load_config, parse_args
from eval import run
from pathvlm.evaluation import format_table
from pathvlm.controls import BLANK_RGB, control_sets, derangement
from pathvlm.evaluation import evaluate, load_sets
from test_eval import one_thread, read_lines, tiny  # noqa: F401  (fixtures, as test_eval_judge takes them)

OPTIONS = ["brown", "blue", "mixed"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """stain.jsonl (7 records, images of three sizes, each with its own image_facts) and one.jsonl (1 record)."""
    root = tmp_path_factory.mktemp("controls-data")
    os.makedirs(root / "images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, count in [("stain", 7), ("one", 1)]:
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(count):
                pixels = rng.integers(0, 256, (56 + 28 * (i % 3), 56 + 14 * (i % 2), 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "images" / f"{name}-{i}.png")
                rec = {"id": f"{name}-{i:03d}", "image": f"images/{name}-{i}.png", "question": "Which stain dominates?",
                       "options": OPTIONS, "answer": "ABC"[i % 3], "image_facts": {"stain": OPTIONS[i % 3], "item": i}}
                f.write(json.dumps(rec) + "\n")
        paths[name] = str(root / f"{name}.jsonl")
    return paths


# ----------------------------------------------------------------------------------------------
# The controls' images

@given(st.integers(2, 60), st.integers(0, 2**32 - 1))
def test_derangement_leaves_no_item_its_own_image(n, seed):
    order = derangement(n, seed)
    assert sorted(order) == list(range(n))  # every image is shown once
    assert all(order[i] != i for i in range(n))
    assert derangement(n, seed) == order  # seeded: a resumed run shows each item the same image


def test_derangement_of_one_item_is_refused():
    with pytest.raises(ValueError, match="1 item"):
        derangement(1, seed=0)


def test_shuffled_control_shows_another_items_image_whatever_the_limit(data, tmp_path):
    full = load_sets([f"stain={data['stain']}", f"one={data['one']}"])
    controls, skipped = control_sets(full, ["shuffled"], seed=3, blank_dir=str(tmp_path))
    shown = controls["stain[shuffled]"]
    assert [r.id for r in shown] == [r.id for r in full["stain"]]
    assert sorted(r.image for r in shown) == sorted(r.image for r in full["stain"])
    by_image = {r.image: r for r in full["stain"]}
    for own, other in zip(full["stain"], shown):
        assert other.image != own.image
        assert other.image_facts == by_image[other.image].image_facts  # the facts go with the image
        assert (other.question, other.options, other.answer) == (own.question, own.options, own.answer)
    # a one-item set has no other image: skipped, and said so
    assert "one[shuffled]" not in controls and skipped == {"one[shuffled]": "1 item(s): no other image to show"}
    # limit=3 takes the first three of the same assignment (drawn over the whole set): a run resumed
    # with another limit never shows an item two different images
    limited, _ = control_sets(full, ["shuffled"], seed=3, blank_dir=str(tmp_path), limit=3)
    assert [r.image for r in limited["stain[shuffled]"]] == [r.image for r in shown[:3]]
    other_seed, _ = control_sets(full, ["shuffled"], seed=4, blank_dir=str(tmp_path))
    assert [r.image for r in other_seed["stain[shuffled]"]] != [r.image for r in shown]


def test_blank_image_has_the_size_of_the_original(data, tmp_path):
    full = load_sets([f"stain={data['stain']}", f"one={data['one']}"])
    controls, skipped = control_sets(full, ["blank"], seed=0, blank_dir=str(tmp_path / "blank"))
    assert skipped == {} and list(controls) == ["stain[blank]", "one[blank]"]
    for name in ("stain", "one"):
        for own, blank in zip(full[name], controls[f"{name}[blank]"], strict=True):
            with Image.open(own.image) as original, Image.open(blank.image) as image:
                assert image.size == original.size
                pixels = np.asarray(image.convert("RGB"))
            assert (pixels == BLANK_RGB).all()
            assert blank.image_facts == {}  # a blank image measures nothing
            assert os.path.dirname(blank.image) == str(tmp_path / "blank")
    # one file per size, shared by the items of that size: (56, 56), (70, 84), (56, 112), (70, 56), ...
    sizes = {Image.open(r.image).size for r in full["stain"] + full["one"]}
    assert len(os.listdir(tmp_path / "blank")) == len(sizes) > 1


# ----------------------------------------------------------------------------------------------
# eval.py end to end

def test_eval_with_image_controls_writes_and_resumes(tiny, data, tmp_path):
    out = tmp_path / "run"
    common = ["model=tiny", f"output_dir={out}", "max_new_tokens=10", "batch_size=4",
              "image_controls=[blank, shuffled]", f"sets=[stain={data['stain']}, one={data['one']}]"]
    # 1. the first three items of each set, judged by the rule judge
    first = run(parse_args(EvalConfig, common + ["limit=3", "judge=rule"]), *tiny)
    stain = first["sets"]["stain"]
    assert set(stain["controls"]) == {"blank", "shuffled"}
    assert stain["controls"]["blank"]["n"] == stain["controls"]["shuffled"]["n"] == 3 == stain["n"]
    assert stain["controls"]["blank"]["generated"] == 3
    assert first["sets"]["one"]["controls"]["blank"]["n"] == 1
    assert first["sets"]["one"]["controls"]["shuffled"] == {"skipped": "1 item(s): no other image to show"}
    assert list(first["sets"]) == ["stain", "one"]  # the controls sit inside their set, not beside it
    # predictions.jsonl (and the judge) hold the real images' answers only; the controls have their own file
    assert {p["set"] for p in read_lines(out / "predictions.jsonl")} == {"stain", "one"}
    assert {j["set"] for j in read_lines(out / "judgements.jsonl")} == {"stain", "one"}
    controls_path = out / "controls" / "predictions.jsonl"
    expected = [(f"stain[{c}]", f"stain-{i:03d}") for c in ("blank", "shuffled") for i in range(3)]
    expected.append(("one[blank]", "one-000"))
    assert sorted((p["set"], p["id"]) for p in read_lines(controls_path)) == sorted(expected)
    # 2. resumed on the whole sets: only the four new items of each control are generated
    second = run(parse_args(EvalConfig, common), *tiny)
    assert second["sets"]["stain"]["generated"] == 4
    assert {c: m["generated"] for c, m in second["sets"]["stain"]["controls"].items()} == {"blank": 4, "shuffled": 4}
    preds = read_lines(controls_path)
    keys = [(p["set"], p["id"]) for p in preds]
    assert len(keys) == len(set(keys)) == 7 + 7 + 1
    for control in ("blank", "shuffled"):
        m = second["sets"]["stain"]["controls"][control]
        mine = [p for p in preds if p["set"] == f"stain[{control}]"]
        assert (m["n"], m["correct"]) == (7, sum(p["correct"] for p in mine))
    # the answers are the model's on the control images: answered again here, they are the same
    full = load_sets([f"stain={data['stain']}"])
    controls, _ = control_sets(full, ["blank", "shuffled"], seed=0, blank_dir=str(out / "controls"))
    again = evaluate(*tiny, controls, batch_size=4, max_new_tokens=10, predictions_path=str(tmp_path / "again.jsonl"),
                     log=lambda *a: None)
    assert {(p["set"], p["id"]): p["completion"] for p in read_lines(tmp_path / "again.jsonl")} == {
        (p["set"], p["id"]): p["completion"] for p in preds if p["set"].startswith("stain[")}
    assert again["stain[blank]"]["correct"] == second["sets"]["stain"]["controls"]["blank"]["correct"]
    # 3. nothing left to generate; metrics.json and the table carry the controls
    third = run(parse_args(EvalConfig, common), *tiny)
    assert [m["generated"] for m in third["sets"]["stain"]["controls"].values()] == [0, 0]
    with open(out / "metrics.json") as f:
        assert json.load(f)["sets"]["stain"]["controls"] == json.loads(json.dumps(third["sets"]["stain"]["controls"]))
    header, stain_row, one_row = format_table(third["sets"]).splitlines()
    assert header.split()[-4:] == ["blank", "%", "shuffled", "%"]
    accuracy = third["sets"]["stain"]["controls"]["shuffled"]["accuracy"]
    assert stain_row.split()[-1] == f"{100 * accuracy:.1f}" and one_row.split()[-1] == "-"


def test_unknown_control_is_refused(data, tmp_path):
    with pytest.raises(ConfigError, match=r"key 'image_controls': unknown control 'grey'; allowed: blank, shuffled"):
        load_config(EvalConfig, None, ["image_controls=[blank, grey]"])
    with pytest.raises(SystemExit, match="image_controls.*'grey'"):
        parse_args(EvalConfig, ["image_controls=[grey]"])
    with pytest.raises(ConfigError, match="names a control twice"):
        load_config(EvalConfig, None, ["image_controls=[blank, blank]"])
    with pytest.raises(ConfigError, match="image_controls' must be a list"):
        load_config(EvalConfig, None, ["image_controls=blank"])
    assert load_config(EvalConfig, None, ["image_controls=[shuffled]"]).image_controls == ["shuffled"]
    # a config built in code (no validate) is refused by run() before any model loads or file is written
    cfg = EvalConfig(model="tiny", sets=[f"stain={data['stain']}"], output_dir=str(tmp_path / "r"),
                     image_controls=["grey"])
    with pytest.raises(SystemExit, match="unknown image control 'grey'"):
        run(cfg)
    assert not os.path.exists(tmp_path / "r" / "predictions.jsonl")
