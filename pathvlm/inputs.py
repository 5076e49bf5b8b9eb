"""Inputs a config names, checked before any model loads: a missing split found after a 16 GB download (or
minutes of loading) is a run lost. The scripts print an InputError's message alone: it names the key and the
path, and a traceback would only bury it. The model name itself is checked by model.check_model.
"""

import os
import sys
from collections import Counter

from pathvlm import openqa
from pathvlm.config import EvalConfig, GRPOConfig, SFTConfig
from pathvlm.errors import InputError  # noqa: F401  (where tests and older scripts import it from)
from pathvlm.errors import BadInput, MissingInput, path_problem
from pathvlm.images import file_sha256


def check_inputs(cfg) -> dict[str, dict[str, int]]:
    """Everything a script's config points at: output_dir can be made, every split parses and every record
    (image included) is usable, adapter directories hold an adapter, judge=api has its key, the device exists.
    Returns each split's key -> its records of each kind ({"data": {"closed": 120, "open": 80}}) and prints
    them, a line per split ("key 'data': <path>: 200 records, closed 120, open 80"): a split that mixes in
    open questions is seen before the run, not first in its metrics."""
    check_device(cfg.device)
    check_output_dir(cfg.output_dir)
    check_tiny_cache(cfg.model, cfg.seed)
    resume = getattr(cfg, "resume", "none")  # a training script's
    if resume not in ("auto", "none") and not os.path.isfile(os.path.join(resume, "state.pt")):
        raise MissingInput(f"key 'resume': no checkpoint at {resume} (no state.pt there): give a checkpoint "
                           "directory (<output_dir>/checkpoints/step_N), or resume=auto (the newest in output_dir) "
                           "| none")
    splits = {}  # key -> (path, kinds)
    if isinstance(cfg, EvalConfig):
        for spec in cfg.sets:  # a malformed spec is evaluation.load_sets' to name
            name, sep, path = spec.partition("=")
            if sep and path.strip():
                key = f"sets ({name.strip()})"
                splits[key] = path.strip(), check_split(key, path.strip())
        check_adapter("adapter", cfg.adapter)
    else:
        splits["data"] = cfg.data, check_split("data", cfg.data)
        if cfg.eval_data and (isinstance(cfg, SFTConfig) or cfg.eval_every):  # GRPO reads it only to evaluate
            splits["eval_data"] = cfg.eval_data, check_split("eval_data", cfg.eval_data)
        # train_grpo.py takes a finetune=full SFT model as its base (the demo's path)
        check_adapter("init_adapter", cfg.init_adapter, full_model_ok=isinstance(cfg, GRPOConfig))
    if "eval_data" in splits:
        check_heldout_apart(cfg.data, cfg.eval_data)
    if isinstance(cfg, GRPOConfig):
        check_rule_judge_scope(cfg)
    if getattr(cfg, "judge", "none") == "api" and not os.environ.get(cfg.judge_api_key_env):
        raise BadInput(f"judge=api reads its key from the environment variable {cfg.judge_api_key_env}, which is not "
                       f"set: export {cfg.judge_api_key_env}=... (or judge=self | rule)")
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process checks; one says so
        for key, (path, kinds) in splits.items():
            counts = ", ".join(f"{kind} {n}" for kind, n in kinds.items())
            print(f"key '{key}': {path}: {sum(kinds.values())} records, {counts}")
    return {key: kinds for key, (_, kinds) in splits.items()}


def check_rule_judge_scope(cfg):
    """The rule judge is the demo's judge: it checks what a reasoning says about the image only against the
    record's image_facts. Trained against it on records without them, a policy is paid the image step for any
    sentence shaped like an image statement; refused unless rule_judge_without_image_facts says to go on."""
    if cfg.judge != "rule" or "process" not in cfg.rewards or cfg.rule_judge_without_image_facts:
        return
    from pathvlm.records import load_split

    records = load_split(cfg.data)
    lacking = [r for r in records if not r.image_facts]
    if lacking:
        raise BadInput(f"judge=rule: {len(lacking)} of {len(records)} records in {cfg.data} carry no image_facts "
                       f"(e.g. '{lacking[0].id}'), so the rule judge cannot check what their reasoning says about "
                       "the image, and a content-free template would earn the image step. Use judge=api | self, or "
                       "rule_judge_without_image_facts=true to train against the rule judge anyway (docs/judges.md)")


def check_heldout_apart(train_path: str, heldout_path: str):
    """The held-out split (eval_data) shares no image with the training split (data): a held-out loss or
    accuracy measured on training images reads as generalisation and is memory. Images are compared by the
    sha256 of their bytes, not their resolved paths: PathMMU holds one image under two file names, and a split
    prepared twice into two folders holds the same images at two paths; equal paths have equal bytes, so a
    path match is caught too. Only files whose size occurs on both sides are read. An overlap stops the run.

    A question text is no proof: templated questions ("Which stain dominates this patch?", PathVQA's "is this
    a tumor?") repeat over thousands of images by design. One that is written once in each split and sits on
    two different images (a question bank copied with re-encoded images?) is counted in a printed warning."""
    from pathvlm.records import image_path, load_split

    train, heldout = load_split(train_path), load_split(heldout_path)
    train_hashes = content_hashes([image_path(train_path, r) for r in train],
                                  [image_path(heldout_path, r) for r in heldout])
    train_of = {}  # image hash -> the first training record that shows it
    for r in train:
        if image_path(train_path, r) in train_hashes:
            train_of.setdefault(train_hashes[image_path(train_path, r)], r)
    heldout_hashes = content_hashes([image_path(heldout_path, r) for r in heldout], list(train_hashes))
    shared = [(r, train_of[h]) for r in heldout
              if (h := heldout_hashes.get(image_path(heldout_path, r))) is not None and h in train_of]
    if shared:
        held, seen = shared[0]
        raise BadInput(f"key 'eval_data': {len(shared)} of {len(heldout)} records in {heldout_path} show an image "
                       f"that the training split {train_path} (key 'data') also holds, e.g. '{held.id}' "
                       f"({held.image}, the image of '{seen.id}'): a held-out measure on training images reads as "
                       "generalisation and is memory. Point eval_data at a split prepared apart from the training "
                       "data (the preparers' val.jsonl), or eval_data=none for no held-out measure")
    once = Counter(openqa.normalise(r.question) for r in train)
    held_once = Counter(openqa.normalise(r.question) for r in heldout)
    same_text = [r for r in heldout if once[q := openqa.normalise(r.question)] == 1 and held_once[q] == 1]
    if same_text:
        print(f"warning: key 'eval_data': {len(same_text)} of {len(heldout)} records in {heldout_path} ask a question "
              f"written once in it and once in the training split {train_path}, on another image (e.g. "
              f"'{same_text[0].id}'): the same item with a re-encoded image? Check before trusting the held-out "
              "measure", file=sys.stderr)


def content_hashes(paths: list[str], others: list[str]) -> dict[str, str]:
    """sha256 of each file in `paths` whose size is that of some file in `others` (the other side's files):
    a file of a size the other side lacks cannot be the same image, so it is not read."""
    sizes = {os.path.getsize(p) for p in others}
    hashes = {}
    for path in dict.fromkeys(paths):
        if os.path.getsize(path) in sizes:
            hashes[path] = file_sha256(path)
    return hashes


def check_device(device: str):
    """device=cuda (or cuda:N) needs a GPU torch can see: said now, not as a CUDA error inside the model load."""
    if not device.startswith("cuda"):
        return
    import torch  # here: config.py itself stays light (the scripts have imported torch already)

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if count == 0:
        raise BadInput(f"key 'device': device={device}, but torch sees no CUDA GPU (check the driver, "
                       "CUDA_VISIBLE_DEVICES and that torch is a CUDA build: docs/gpu.md); or use device=auto | cpu")
    if index >= count:
        raise BadInput(f"key 'device': device={device}, but torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}")


def check_tiny_cache(model: str, seed: int):
    """The embedded model is built once into PATHVLM_CACHE: where that cannot be written, say so before the run
    claims its output_dir, not as a traceback from save_pretrained once it has."""
    import tempfile

    from pathvlm.tiny import TINY_SIZES, cache_dir, tiny_path

    if model not in TINY_SIZES or os.path.isfile(os.path.join(tiny_path(model, seed), "config.json")):
        return
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        tempfile.TemporaryFile(dir=cache_dir()).close()
    except OSError as e:
        why = path_problem(cache_dir(), "directory") if os.path.exists(cache_dir()) else None
        raise BadInput(f"model={model} is built once into {cache_dir()} (PATHVLM_CACHE, default ~/.cache/pathvlm-r1), "
                       f"which {why or f'cannot be written ({e.strerror})'}: set PATHVLM_CACHE to a writable folder"
                       ) from None


def check_output_dir(path: str):
    if not path.strip():
        raise BadInput("key 'output_dir' is empty: give the directory the run writes to (e.g. runs/my-run)")
    real = os.path.realpath(path)
    for system in ("/proc", "/sys", "/dev"):
        if real == system or real.startswith(system + "/"):
            raise BadInput(f"key 'output_dir': {path} is in {system}, a file system the kernel makes up, not a disk: "
                           "give a directory on a disk (e.g. runs/my-run)")
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        raise BadInput(f"key 'output_dir': {existing} is a file, so output_dir={path} cannot be a directory")
    if not os.access(existing or ".", os.W_OK | os.X_OK):
        raise BadInput(f"key 'output_dir': {os.path.abspath(existing or '.')} is not writable by this user, so "
                       f"output_dir={path} cannot be made there: choose another directory")


def check_split(key: str, path: str) -> dict[str, int]:
    """A prepared JSONL split as a training or test set: each record as the data preparers leave it
    (records.check_record: fields of their types, unique id, a question; closed: >= 2 options, the answer among
    them; open: a reference answer; an image that decodes to the end with an aspect ratio the processor takes).
    Images outside the split's folder (absolute, ../, a symlink) are allowed in a split written by hand, with a
    note: the API judge uploads them. Returns how many records of each kind it holds: {"closed": n, "open": m}."""
    from pathvlm.records import KINDS, check_records, load_split, text_warnings

    try:
        records = load_split(path)
    except FileNotFoundError as e:
        raise MissingInput(f"key '{key}': {e}") from None
    except UnicodeDecodeError as e:  # a ValueError whose own message does not name the file
        raise BadInput(f"key '{key}': {path} is not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start}): "
                       "save it as UTF-8") from None
    except ValueError as e:
        raise BadInput(f"key '{key}': {e}") from None
    root = os.path.dirname(os.path.abspath(path))
    real_root = os.path.realpath(root)
    elsewhere = [r for r in records
                 if os.path.commonpath([os.path.realpath(os.path.join(root, r.image)), real_root]) != real_root]
    if elsewhere:
        print(f"note: key '{key}': {len(elsewhere)} of {len(records)} records in {path} name an image outside its "
              f"folder (absolute, ../ or a symlink), e.g. '{elsewhere[0].id}': {elsewhere[0].image}; they are used "
              "as named, and an API judge uploads each image a record names", file=sys.stderr)
    missing = [r for r in records if path_problem(os.path.join(root, r.image)) == "does not exist"]
    if missing:
        example = os.path.join(root, missing[0].image)
        raise MissingInput(f"key '{key}': {path}: {len(missing)} images missing, e.g. {example} (record "
                           f"'{missing[0].id}'); re-run the data preparation")
    bad = [f"'{r.id}': {reason}" for r, reason in zip(records, check_records(records, root)) if reason]
    if bad:
        raise BadInput(f"key '{key}': {path}: {len(bad)} of {len(records)} records cannot be used ({'; '.join(bad[:3])}"
                       f"{' ...' if len(bad) > 3 else ''}); the data preparers drop such records (and list them in "
                       "report.json): re-run the preparation or fix the file")
    warned = Counter(w for r in records for w in text_warnings(r))
    for warning, n in warned.items():
        print(f"warning: key '{key}': {n} of {len(records)} records in {path} have {warning}; the model sees it as "
              "written, a judge as escaped JSON", file=sys.stderr)
    return {kind: sum(r.kind == kind for r in records) for kind in KINDS}


def check_adapter(key: str, path: str | None, full_model_ok: bool = False):
    if path is None or os.path.isfile(os.path.join(path, "adapter_config.json")):
        return
    if os.path.isfile(os.path.join(path, "config.json")):
        if full_model_ok:
            return
        raise MissingInput(f"key '{key}': {path} holds a whole model, not a LoRA adapter: give it as model={path}")
    what = path_problem(path, "directory") or "has no adapter_config.json"
    if os.path.isfile(os.path.join(path, "model", "adapter_config.json")):  # a checkpoint: its adapter is in model/
        what += f"; it is a checkpoint, whose adapter is {os.path.join(path, 'model')}: give that"
    raise MissingInput(f"key '{key}': {path} {what} (give the output_dir of a finished train_sft.py / "
                       "train_grpo.py run)")
