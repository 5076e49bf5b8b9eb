"""The demo dataset: stain questions on real immunohistochemistry patches, for the embedded tiny model.

    python data/demo/prepare.py              # -> data/demo/prepared/{sft,rl,test,val}.jsonl + images/
    python data/demo/prepare.py --kind open  # -> data/demo/prepared_open/: the same patches, open questions

Source: `skimage.data.immunohistochemistry()`, a 512x512 IHC-stained section of human colon that
ships with scikit-image: DAB (brown) marks the antigen, hematoxylin (blue) counterstains nuclei.
Each 56-px patch asks "Which stain dominates this patch?" with options brown / blue / mixed in a
shuffled order. The answer is measured, not guessed: colour deconvolution (`rgb2hed`) separates the
two stains and the log ratio of mean DAB to mean hematoxylin gives the class; patches near a class
boundary are dropped so that every kept answer is visible.

Test patches come from 64-px blocks never used for training, a quarter of the section scattered
over it by the seed (no test crop overlaps a training crop). SFT and RL patches are crops of the same
training blocks; the same crop can be drawn twice, so a patch already in one split is passed over by the
other: no patch is in two splits (report.json counts those passed over).

The validation split (val, --val-size, true labels) is what the training-time curves read (eval_data in
configs/demo_*.yaml): crops of the training blocks, as RL's are, none of them a patch of another split. It is
drawn after test, so test holds the same patches, labels and option orders as before val existed. Its crops
share tissue blocks with training crops (test's never do), so it reads a little easier than test: it is for
watching a run and choosing a checkpoint, the test split for the number reported.

The SFT split carries a *systematic annotator error*: a share of the blue patches (--sft-blue-as-mixed,
default 0.65) are labelled "mixed", with an explanation to match, as a careless annotator would.
The RL and test splits carry the true labels. SFT then learns the format and most of the task but
confuses blue with mixed; GRPO, rewarded by the verifiable true answer, can correct it. That is the
paper's story (RL improves on SFT) made measurable on a CPU in minutes. Set --sft-blue-as-mixed 0 for
clean SFT labels.

--kind open asks the same question of the same patches without options (OPEN_QUESTION): the reference is
the class word, with other accepted wordings (ALTERNATIVES: "DAB", "hematoxylin", "both", ...), and the SFT
split carries the same annotator error. The random draws are the same for both kinds, so the two demos hold
the same patches and labels and differ only in the question.
"""

import argparse
import hashlib
import os
import sys
from collections import Counter

import numpy as np
from PIL import Image
from skimage import data as skdata
from skimage.color import rgb2hed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from data.common import out_folder, write_report  # noqa: E402
from pathvlm.errors import run_script  # noqa: E402
from pathvlm.records import Record, SplitWriter  # noqa: E402

CLASSES = ["brown", "blue", "mixed"]
QUESTION = "Which stain dominates this patch?"
OPEN_QUESTION = "Which stain dominates this patch? Answer in one or two words."
# other wordings of each class an open answer is credited for (records.Record.alternatives): the stain's name,
# its colour with it, and the words for a balance of the two
ALTERNATIVES = {"brown": ["DAB", "DAB brown", "mostly brown"], "blue": ["hematoxylin", "mostly blue"],
                "mixed": ["both", "brown and blue", "balanced", "both brown and blue"]}
# The reasoning follows the paper's order: image feature -> option elimination -> knowledge -> answer.
FEATURE = {"brown": "The patch is mostly brown.", "blue": "The patch is mostly blue.",
           "mixed": "The patch shows both brown and blue."}
KNOWLEDGE = {"brown": "DAB marks the antigen brown.", "blue": "Hematoxylin stains nuclei blue.",
             "mixed": "DAB and hematoxylin are balanced."}

PATCH = 56  # 56 px = 4x4 vision patches of 14 px = 4 tokens after the 2x2 merge
BLOCK = 64  # the image is cut into 8x8 blocks of 64 px; a patch never crosses a block
N_TEST_BLOCKS = 16  # a quarter of the blocks, scattered over the section by the seed, are held out for test


def explanation(label: str) -> str:
    others = [c for c in CLASSES if c != label]
    return f"{FEATURE[label]} {others[0].capitalize()} and {others[1]} are ruled out. {KNOWLEDGE[label]}"


def stain_amounts(patch_rgb: np.ndarray) -> tuple[float, float]:
    """(mean hematoxylin, mean DAB) optical density of the patch, by colour deconvolution."""
    hed = rgb2hed(patch_rgb)
    return float(hed[..., 0].mean()), float(hed[..., 2].mean())


def stain_score(patch_rgb: np.ndarray) -> float:
    """log(mean DAB / mean hematoxylin): > 0 brown-dominated, < 0 blue-dominated."""
    hematoxylin, dab = stain_amounts(patch_rgb)
    return float(np.log((dab + 1e-3) / (hematoxylin + 1e-3)))


def image_facts(patch_rgb: np.ndarray, label: str) -> dict:
    """What the patch measures, for the rule judge's image check (judges.py): the true class, never the
    SFT annotator's, and the two stain amounts it comes from."""
    hematoxylin, dab = stain_amounts(patch_rgb)
    return {"stain": label, "hematoxylin": round(hematoxylin, 5), "dab": round(dab, 5)}


def candidate_patches(image: np.ndarray, rng: np.random.Generator, per_block: int, test_blocks: set):
    """Random crops inside each block, with a random dihedral transform (rotation/flip) each."""
    out = []
    for by in range(image.shape[0] // BLOCK):
        for bx in range(image.shape[1] // BLOCK):
            for _ in range(per_block):
                y = by * BLOCK + rng.integers(0, BLOCK - PATCH + 1)
                x = bx * BLOCK + rng.integers(0, BLOCK - PATCH + 1)
                patch = np.rot90(image[y:y + PATCH, x:x + PATCH], k=int(rng.integers(4)))
                if rng.random() < 0.5:
                    patch = patch[:, ::-1]
                out.append(((by, bx) in test_blocks, np.ascontiguousarray(patch), stain_score(patch)))
    return out


def label_patches(candidates, margin: float):
    """Class boundaries at the 33rd/67th percentiles of the score; patches within `margin`
    percentile points of a boundary are ambiguous and dropped."""
    scores = np.array([c[2] for c in candidates])
    ranks = scores.argsort().argsort() / len(scores) * 100
    labelled = []
    for (is_test, patch, _), rank in zip(candidates, ranks):
        if abs(rank - 33.3) < margin or abs(rank - 66.7) < margin:
            continue
        label = "blue" if rank < 33.3 else ("mixed" if rank < 66.7 else "brown")
        labelled.append((is_test, patch, label))
    return labelled


def take_patch(pool: list, start: int, split: str, split_of: dict) -> int | None:
    """The index of the first patch in pool[start:] that no other split holds, or None when there is none.
    A block offers 9 x 9 crop positions x 8 transforms, so a crop can be drawn twice; SFT and RL draw
    from the same blocks, and without this check one patch could be in both. split_of maps a patch's
    pixels (hashed) to the split that took it."""
    for index in range(start, len(pool)):
        key = hashlib.sha1(pool[index].tobytes()).hexdigest()
        if split_of.get(key, split) == split:
            split_of[key] = split
            return index
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=["closed", "open"], default="closed",
                   help="closed: options brown / blue / mixed (the default demo); open: no options, a word to write")
    p.add_argument("--out", type=out_folder, default=None,
                   help="default: data/demo/prepared (closed), data/demo/prepared_open (open)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-size", type=int, default=1500)
    p.add_argument("--rl-size", type=int, default=900)
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--val-size", type=int, default=150,
                   help="the validation split the training-time curves read (crops of the training blocks)")
    p.add_argument("--sft-blue-as-mixed", type=float, default=0.65,
                   help="share of blue SFT patches labelled 'mixed' (the annotator error GRPO should fix)")
    p.add_argument("--margin", type=float, default=4.0, help="percentile points dropped around each boundary")
    args = p.parse_args(argv)
    args.out = args.out or ("data/demo/prepared" if args.kind == "closed" else "data/demo/prepared_open")

    rng = np.random.default_rng(args.seed)
    image = skdata.immunohistochemistry()
    # held-out blocks scattered over the whole section, so test tissue looks like training tissue
    # without any test crop overlapping a training crop
    n_side = image.shape[0] // BLOCK
    test_blocks = {divmod(int(i), n_side) for i in rng.choice(n_side * n_side, N_TEST_BLOCKS, replace=False)}
    train_blocks = n_side * n_side - N_TEST_BLOCKS
    # 1.6x the patches needed, and never fewer than 30 a block: classes are unevenly spread over the image.
    # val is left out of the sum: counting it would change the crops drawn, and so the test split
    per_block = max(30, int(1.6 * max((args.sft_size + args.rl_size) / train_blocks, args.test_size / N_TEST_BLOCKS)))
    labelled = label_patches(candidate_patches(image, rng, per_block, test_blocks), args.margin)

    # balanced classes: each split takes size/3 patches of each class from its own blocks
    pools = {(t, c): [p for is_t, p, lab in labelled if is_t == t and lab == c] for t in (0, 1) for c in CLASSES}
    # val last: the draws for test's option orders come before val's, so test is the same with or without val
    wanted = {"sft": args.sft_size, "rl": args.rl_size, "test": args.test_size, "val": args.val_size}
    writer = SplitWriter(args.out)
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    taken = {key: 0 for key in pools}  # how far each pool has been walked
    split_of = {}
    passed_over = 0
    for split, size in wanted.items():
        is_test = int(split == "test")
        for i in range(size):
            label = CLASSES[i % 3]
            pool = pools[(is_test, label)]
            index = take_patch(pool, taken[(is_test, label)], split, split_of)
            if index is None:
                sys.exit(f"not enough '{label}' patches for split {split}: lower the split sizes or the margin")
            passed_over += index - taken[(is_test, label)]
            patch = pool[index]
            taken[(is_test, label)] = index + 1
            given = label
            if split == "sft" and label == "blue" and rng.random() < args.sft_blue_as_mixed:
                given = "mixed"
            options = list(rng.permutation(CLASSES))  # drawn for both kinds: the same draws, the same patches
            rid = f"demo-{split}-{i:05d}"
            rel = f"images/{rid}.png"
            Image.fromarray(patch).save(os.path.join(args.out, rel))
            if args.kind == "closed":
                record = Record(id=rid, image=rel, question=QUESTION, options=options,
                                answer="ABC"[options.index(given)], explanation=explanation(given))
            else:
                record = Record(id=rid, image=rel, question=OPEN_QUESTION, options=[], answer=given,
                                alternatives=ALTERNATIVES[given], explanation=explanation(given))
            record.source, record.image_facts = f"demo/stain/{label}", image_facts(patch, label)
            writer.add(split, record)
    write_report(writer, Counter(), list(wanted), kind=args.kind, seed=args.seed,
                 wanted=[split for split in wanted if split != "val" or args.val_size],  # 0: no val asked
                 sft_blue_as_mixed=args.sft_blue_as_mixed,
                 patches_in_another_split_passed_over=passed_over,
                 empty_hint=f"The sizes asked were {wanted}: raise --sft-size, --rl-size, --test-size or "
                            "--val-size.")


if __name__ == "__main__":
    run_script(main)
