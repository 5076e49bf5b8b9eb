"""The held-out split a training run measures itself on: never the training data (inputs.check_heldout_apart,
in both loops, by image content and by question text), and the curve's items a fixed, stratified sample of
it (training.curve_sample, training.curve_items), with a note when it is the test split."""

import json
import os
import shutil
from collections import Counter
from dataclasses import asdict

import pytest

import train_grpo
import train_sft
from pathvlm.inputs import InputError, check_heldout_apart
from pathvlm.records import Record, load_split
from pathvlm.training import curve_items, curve_sample, curve_stratum

SFT = ["configs/demo_sft.yaml", "model=tiny", "max_steps=1", "batch_size=4"]
GRPO = ["configs/demo_grpo.yaml", "model=tiny", "init_adapter=none", "reference=base", "max_steps=1",
        "num_prompts=2", "group_size=2", "max_new_tokens=4", "eval_every=1", "eval_items=4"]


def write_split(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))
    return str(path)


def renamed_copy(demo_data, split, out, take=None):
    """The split's records, their images copied under new file names into `out`: the same images by content,
    at other paths (as PathMMU holds one image under two names, or a split prepared twice)."""
    records = load_split(f"{demo_data}/{split}.jsonl")[:take]
    (out / "pics").mkdir(parents=True, exist_ok=True)
    for r in records:
        shutil.copy(os.path.join(demo_data, r.image), out / "pics" / f"copy-{r.id}.png")
        r.image, r.id = f"pics/copy-{r.id}.png", f"copy-{r.id}"
    return records


# ----------------------------------------------------------------------------------------------
# Training and held-out data never overlap silently

def test_sft_stops_when_eval_data_is_its_training_data(demo_data, tmp_path):
    with pytest.raises(InputError, match=r"key 'eval_data': 48 of 48 records in .*sft\.jsonl show an image that "
                                         r"the training split .*sft\.jsonl \(key 'data'\) also holds, e\.g\. "
                                         r"'demo-sft-00000'.*val\.jsonl"):
        train_sft.main([*SFT, f"data={demo_data}/sft.jsonl", f"eval_data={demo_data}/sft.jsonl",
                        f"output_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()  # stopped before anything was claimed


def test_grpo_stops_when_eval_data_holds_a_training_image_under_another_name(demo_data, tmp_path):
    """One RL image, copied under another file name into a held-out split of test items: found by content."""
    heldout = load_split(f"{demo_data}/test.jsonl")[:5] + renamed_copy(demo_data, "rl", tmp_path / "held", take=1)
    for r in heldout[:5]:
        r.image = os.path.join(demo_data, r.image)
    path = write_split(tmp_path / "held" / "split.jsonl", heldout)
    with pytest.raises(InputError, match=r"1 of 6 records in .*split\.jsonl show an image .* e\.g\. "
                                         r"'copy-demo-rl-00000' \(pics/copy-demo-rl-00000\.png, the image of "
                                         r"'demo-rl-00000'\)"):
        train_grpo.main([*GRPO, f"data={demo_data}/rl.jsonl", f"eval_data={path}",
                         f"output_dir={tmp_path / 'run'}"])


def test_separate_splits_pass_and_a_unique_question_on_another_image_is_counted(demo_data, tmp_path, capsys):
    for split in ("val", "test"):
        check_heldout_apart(f"{demo_data}/sft.jsonl", f"{demo_data}/{split}.jsonl")
        check_heldout_apart(f"{demo_data}/rl.jsonl", f"{demo_data}/{split}.jsonl")
    assert "warning" not in capsys.readouterr().err  # the demo's one templated question is no overlap
    train = load_split(f"{demo_data}/sft.jsonl")[:4]
    held = load_split(f"{demo_data}/val.jsonl")[:4]
    for r in train + held:
        r.image = os.path.join(demo_data, r.image)
    train[0].question = "What does the lower left corner of this patch show?"
    held[2].question = "what does the lower-left corner of this patch show"  # the same after openqa.normalise
    check_heldout_apart(write_split(tmp_path / "a" / "train.jsonl", train),
                        write_split(tmp_path / "b" / "held.jsonl", held))
    assert ("warning: key 'eval_data': 1 of 4 records in" in capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------
# The curve's items: a fixed, seeded, stratified sample, not the first N

def closed(i, letter):
    return Record(id=f"r{i}", image="x.png", question="q?", options=["a", "b", "c"], answer=letter)


def test_curve_sample_keeps_the_letters_in_proportion_and_is_fixed():
    # written in order A..A B..B C..C, as a preparer may write them: the first 12 are all A
    records = [closed(i, "ABC"[i // 20]) for i in range(60)]
    records += [Record(id=f"o{i}", image="x.png", question="q?", options=[], answer="blue") for i in range(20)]
    sample = curve_sample(records, 12)
    assert Counter(map(curve_stratum, sample)) == {"closed A": 3, "closed B": 3, "closed C": 3, "open": 3}
    assert curve_sample(records, 12) == sample  # a resumed run draws the same items
    assert [r.id for r in sample] == sorted((r.id for r in sample), key=[r.id for r in records].index)
    assert curve_sample(records, 0) == records and curve_sample(records, 100) == records
    # 7 of A 20, B 20, C 40: 1.75, 1.75, 3.5 -> 1, 1, 3, and the two seats left to the largest remainders
    uneven = [closed(i, "A" if i < 20 else "B" if i < 40 else "C") for i in range(80)]
    assert Counter(map(curve_stratum, curve_sample(uneven, 7))) == {"closed A": 2, "closed B": 2, "closed C": 3}


def test_curve_items_notes_a_test_split(demo_data, capsys):
    test = load_split(f"{demo_data}/test.jsonl")
    assert curve_items(f"{demo_data}/test.jsonl", test, 6) == curve_sample(test, 6) != test[:6]
    assert "note: eval_data is a test split" in capsys.readouterr().out
    curve_items(f"{demo_data}/val.jsonl", load_split(f"{demo_data}/val.jsonl"), 6)
    assert "note" not in capsys.readouterr().out


def test_grpo_curve_scores_the_sample(demo_data, capsys):
    from pathvlm.config import GRPOConfig
    from pathvlm.model import load_model

    cfg = GRPOConfig(model="tiny", data=f"{demo_data}/rl.jsonl", eval_data=f"{demo_data}/test.jsonl",
                     eval_every=1, eval_items=6)
    _, processor = load_model(cfg, trainable=False)
    _, heldout = train_grpo.load_splits(cfg, processor, True)
    assert [r.id for r in heldout["heldout"]] == [r.id for r in curve_sample(load_split(cfg.eval_data), 6)]
    assert "note: eval_data is a test split" in capsys.readouterr().out
