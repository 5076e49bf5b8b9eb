"""The image controls of an evaluation: every test item answered again with its image blanked and with another
item's image (eval.py's image_controls). A model that reads the image falls to chance on both; one that
answers from the text alone does not. What each control shows is built here; eval.py answers and scores it."""

import os
import random
from dataclasses import replace

from PIL import Image

from pathvlm.allowed import IMAGE_CONTROLS
from pathvlm.records import Record

# Uniform mid-grey: no stain hue (R = G = B) and close to the processor's mean pixel (Qwen2.5-VL's
# image_mean is 0.48, 0.46, 0.41), so the normalised input is near zero everywhere. White would be
# glass, which a pathology patch shows where there is no tissue: the model may have learnt to read it.
BLANK_RGB = (128, 128, 128)


def control_name(set_name: str, control: str) -> str:
    """The name a control's predictions carry in predictions.jsonl: "demo[blank]"."""
    return f"{set_name}[{control}]"


def derangement(n: int, seed: int) -> list[int]:
    """A random permutation p of range(n) with p[i] != i for every i (n >= 2): item i is shown item
    p[i]'s image. Permutations are drawn until one has no fixed point: uniform over derangements, and
    about e = 2.72 draws on average (a random permutation has none with probability ~1/e)."""
    if n < 2:
        raise ValueError(f"no derangement of {n} item(s): every item would keep its own image")
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(order[i] != i for i in range(n)):
            return order


def blank_image(size: tuple[int, int], out_dir: str) -> str:
    """out_dir/blank-WxH.png, a BLANK_RGB image of that size, written once and shared by every item
    of that size. -> its path. Written to a temporary name and renamed, so processes that write it at
    the same time never read half a file."""
    path = os.path.join(out_dir, f"blank-{size[0]}x{size[1]}.png")
    if not os.path.isfile(path):
        os.makedirs(out_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        Image.new("RGB", size, BLANK_RGB).save(tmp, format="PNG")
        os.replace(tmp, path)
    return path


def control_sets(full_sets: dict[str, list[Record]], controls: list[str], seed: int, blank_dir: str,
                 limit: int = 0) -> tuple[dict[str, list[Record]], dict[str, str]]:
    """The records of each control of each set, under control_name, with their image replaced:
      blank:    by a BLANK_RGB image of the same size (blank_image, in blank_dir);
      shuffled: by another item's of the same set, a derangement seeded by `seed`, its image_facts with it.
    full_sets are whole sets (load_sets without a limit): an item is shown the same image whatever
    `limit` a run (or its resume) takes, and the first `limit` items of each control are returned.
    -> (control sets, {control name: why skipped}); shuffled skips a set of fewer than 2 items."""
    out, skipped = {}, {}
    for control in controls:
        if control not in IMAGE_CONTROLS:
            raise ValueError(f"unknown image control '{control}': use {' and/or '.join(IMAGE_CONTROLS)}")
    for name, records in full_sets.items():
        asked = records[:limit] if limit > 0 else records
        for control in controls:
            if control == "blank":
                shown = []
                for r in asked:
                    with Image.open(r.image) as image:  # reads the size from the header, not the pixels
                        size = image.size
                    shown.append(replace(r, image=blank_image(size, blank_dir), image_facts={}))
            elif len(records) < 2:
                skipped[control_name(name, control)] = f"{len(records)} item(s): no other image to show"
                continue
            else:
                order = derangement(len(records), seed)
                shown = [replace(r, image=records[j].image, image_facts=records[j].image_facts)
                         for r, j in zip(asked, order)]
            out[control_name(name, control)] = shown
    return out, skipped
