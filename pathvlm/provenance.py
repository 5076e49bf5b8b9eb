"""Where a number came from, and whether two numbers were measured alike. No torch.

Provenance of a run: the commit, library versions, sha256 of the data splits, fingerprints of the weights,
the judge and the config (tools/reproduce.py records them for every stage it runs). Eval settings: what changes an
evaluation's answers (max_new_tokens, the prompt, the answer parser, quantization, the image budget, ...),
read from an eval.py output_dir, and the warnings when runs set side by side in one table differ in them
(tools/reproduce.py's report and tools/report.py print them).
"""

import datetime
import hashlib
import importlib.metadata
import inspect
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import types

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

# ----------------------------------------------------------------------------------------------
# The code, the libraries, the machine

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets", "tokenizers",
             "safetensors", "numpy", "pillow", "huggingface_hub")


def git_commit(repo: str = REPO) -> dict:
    """{"commit": HEAD's sha or None outside a git checkout, "changed": files that differ from it}: a number made
    with uncommitted code names the files, since the commit alone would not reproduce it."""
    def git(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
    except (OSError, subprocess.TimeoutExpired):  # no git installed, or a hung file system
        return {"commit": None, "changed": []}
    if head.returncode != 0:
        return {"commit": None, "changed": []}
    status = git("status", "--porcelain").stdout.splitlines()  # modified, added and untracked; ignored runs/ not
    return {"commit": head.stdout.strip(), "changed": sorted(line[3:] for line in status)}


def describe_commit(commit: dict) -> str:
    """"f85d1aa" or "f85d1aa + 3 uncommitted files" or "unknown (not a git checkout)"."""
    if not commit.get("commit"):
        return "unknown (not a git checkout)"
    changed = len(commit.get("changed", []))
    return commit["commit"][:7] + (f" + {changed} uncommitted file{'s' * (changed > 1)}" if changed else "")


def library_versions() -> dict:
    """The installed version of each library a run's numbers depend on (None: not installed), and Python's."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_name() -> str:
    """The GPU(s) as nvidia-smi names them, or "cpu" (nvidia-smi rather than torch: this module loads no torch)."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    names = [line.strip() for line in smi.stdout.splitlines() if line.strip()]
    return ", ".join(names) if smi.returncode == 0 and names else "cpu"


# ----------------------------------------------------------------------------------------------
# Data and weights

def file_sha256(path: str) -> str | None:
    """sha256 of a file's bytes (a prepared split: its records, not its images), or None if it is missing."""
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(path: str | None) -> str | None:
    """A short digest of the weight files in a local model or adapter directory (None for a hub id or
    no path): their names and sizes and 64 KiB at 64 places in each. A model trained again into the same
    directory has the same path and config, and other weights: this tells them apart in well under a
    second even for a 15 GB checkpoint, and a copied directory keeps its digest."""
    if not path or not os.path.isdir(path):
        return None
    digest = hashlib.sha1()
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin")):
            file = os.path.join(path, name)
            size = os.path.getsize(file)
            digest.update(f"{name}:{size}".encode())
            with open(file, "rb") as f:
                for i in range(64):
                    f.seek(size * i // 64)
                    digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]


def hub_revision(model: str) -> str | None:
    """The commit of the hub snapshot a hub id resolves to in the local cache (what `from_pretrained` loads
    offline), or None for a local directory, `tiny`, or a model not in the cache."""
    if os.path.isdir(model) or "/" not in model:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # a malformed id or cache: provenance says "unknown" rather than stopping a report
        return None
    return os.path.basename(os.path.dirname(found)) if isinstance(found, str) else None


def is_tiny(model: str | None) -> bool:
    """The embedded tiny model (`tiny`, `tiny-small`), or a directory holding a model trained from it (the demo's
    full SFT): a few million parameters, never comparable with the paper's 7B."""
    if not model:
        return False
    if str(model).startswith("tiny"):
        return True
    config = os.path.join(str(model), "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            text = json.load(f).get("text_config") or {}
    except (OSError, ValueError):
        return False
    return 0 < text.get("hidden_size", 0) < 512  # tiny.py's are 64 and 128; Qwen2.5-VL-3B's is 2048


def judge_of(cfg) -> str:
    """Who graded reasoning in a run, if anyone: "api: gpt-4o (https://...)", "rule", "self" or "none" (an SFT run,
    a GRPO run without the process reward, an eval with judge=none)."""
    if getattr(cfg, "judge", "none") == "none" or "process" not in getattr(cfg, "rewards", {"process": 1}):
        return "none"
    return f"api: {cfg.judge_model} ({cfg.judge_base_url})" if cfg.judge == "api" else cfg.judge


def stage_record(cfg, kind: str, output_dir: str, command: list[str], seconds: float) -> dict:
    """The provenance of a finished run of train_sft.py / train_grpo.py (kind "train") or eval.py ("eval") in
    output_dir, run with cfg: the code (commit, libraries, device), the data (sha256 of each split read), the
    weights (the model's name, hub revision and fingerprint; the adapter's fingerprint and, for training, that of
    the adapter it started from; an evaluation's as eval.py recorded them in weights.json), the judge, the
    resolved config it saved, and the wall-clock seconds of the attempt that finished it."""
    config_path = os.path.join(output_dir, "config.yaml")
    with open(config_path) as f:
        config = yaml.safe_load(f)
    if kind == "train":
        data = {path: file_sha256(path) for path in (cfg.data, cfg.eval_data) if path}
        weights = {"model_fingerprint": weights_fingerprint(cfg.model), "adapter": weights_fingerprint(output_dir),
                   "init_adapter": weights_fingerprint(cfg.init_adapter)}
    else:
        data = {name: file_sha256(path) for name, path in (s.split("=", 1) for s in cfg.sets)}
        with open(os.path.join(output_dir, "weights.json")) as f:
            evaluated = json.load(f)  # eval.py's fingerprints of what it loaded
        weights = {"model_fingerprint": evaluated.get("model"), "adapter": evaluated.get("adapter")}
    weights = {"model": cfg.model, "model_revision": hub_revision(cfg.model), **weights}
    return {"command": shlex.join(command), "seconds": round(seconds, 1),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "libraries": library_versions(), "device": device_name(), "data_sha256": data,
            "weights": weights, "judge": judge_of(cfg), "config": config, "config_sha256": file_sha256(config_path)}


# ----------------------------------------------------------------------------------------------
# The code that turns a completion into a score, and the prompt

def code_fingerprint(function) -> str:
    """sha256 (16 hex) over the source of `function` and of everything of this repository it reaches by name:
    functions and classes (their source), regexes (pattern and flags), constants (their value), and names read
    from a module of ours (`openqa.normalise`). A change anywhere in what decides a score changes it (a comment
    inside those functions too: a false alarm, on the safe side); an unrelated function in the same file does not."""
    parts, todo, seen = {}, [(_name("", "", function), function)], set()
    while todo:
        name, obj = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if isinstance(obj, types.ModuleType):
            continue  # followed through the names read from it, below
        if not ((inspect.isfunction(obj) or inspect.isclass(obj)) and _ours(obj)):
            parts[name] = _stable(obj)
        else:
            try:
                parts[name] = inspect.getsource(obj)
            except OSError:  # no source file (a .pyc alone): the bytecode still tells versions apart
                parts[name] = repr([c.co_code for c in _code_objects(obj)])
            namespace = sys.modules[obj.__module__].__dict__
            for code in _code_objects(obj):
                for word in code.co_names:
                    target = namespace.get(word)
                    if isinstance(target, types.ModuleType) and _ours(target):
                        todo += [(_name(target.__name__, attr, getattr(target, attr)), getattr(target, attr))
                                 for attr in code.co_names if attr in target.__dict__]
                    elif word in namespace and not isinstance(target, types.ModuleType):
                        todo.append((_name(obj.__module__, word, target), target))
    digest = hashlib.sha256("\n".join(f"{k}\n{v}" for k, v in sorted(parts.items())).encode())
    return digest.hexdigest()[:16]


def _name(module: str, word: str, value) -> str:
    """A function or class by where it is defined (the same whichever module imported it), a value by where it
    was read."""
    if inspect.isfunction(value) or inspect.isclass(value):
        return f"{value.__module__}.{value.__qualname__}"
    return f"{module}.{word}"


def _stable(value) -> str:
    """A value as text that is the same in every process: no memory addresses (a function or a class by its
    name), no set order."""
    if isinstance(value, re.Pattern):
        return f"re {value.pattern!r} {int(value.flags)}"
    if isinstance(value, (str, int, float, bool, bytes, type(None))):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_stable, value)) + "]"
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(map(_stable, value))) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_stable(k)}: {_stable(v)}" for k, v in value.items()) + "}"
    return f"<{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}>"


def _ours(obj) -> bool:
    """A function, class or module defined in a file of this repository (not the standard library's)."""
    try:
        path = inspect.getfile(obj)
    except TypeError:  # builtins
        return False
    return os.path.abspath(path).startswith(REPO + os.sep) and ".venv" not in path and "site-packages" not in path


def _code_objects(obj) -> list:
    """Every code object of a function, or of a class's methods, with the ones nested in them (comprehensions,
    lambdas, inner functions)."""
    functions = [obj] if inspect.isfunction(obj) else [v for v in vars(obj).values() if inspect.isfunction(v)]
    todo, codes = [f.__code__ for f in functions], []
    while todo:
        code = todo.pop()
        codes.append(code)
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return codes


def prompt_fingerprint() -> str:
    """sha256 (16 hex) of the chat messages records.prompt_messages makes for a fixed closed and a fixed open
    question: the instruction, the option lines and where the image goes, as the model is shown them. (The chat
    template that wraps them is the model's own, recorded with the model.)"""
    from pathvlm.records import Record, prompt_messages

    closed = Record(id="q", image="q.png", question="Which finding is shown?", options=["first", "second"], answer="A")
    open_ = Record(id="q", image="q.png", question="Which finding is shown?", options=[], answer="first")
    shown = [prompt_messages(closed), prompt_messages(open_)]
    return hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()[:16]


def answer_code() -> dict:
    """What eval.py records beside its metrics: the prompt's fingerprint and the scorer's (evaluation.score,
    through answers.parse_answer and everything it calls). Runs whose values differ asked or scored differently."""
    from pathvlm.evaluation import score

    return {"prompt": prompt_fingerprint(), "parser": code_fingerprint(score)}


# ----------------------------------------------------------------------------------------------
# Eval settings, and the warnings when runs in one table differ in them

# eval.py's config keys that change the answers themselves: max_new_tokens cuts reasoning before </answer>,
# limit answers other items, min/max_pixels is the image budget, quantization and dtype change the weights' values
ANSWER_SETTINGS = ("max_new_tokens", "limit", "min_pixels", "max_pixels", "quantization", "dtype")


def eval_settings(config: dict, metrics: dict, split_hashes: dict | None = None) -> dict:
    """{setting: value} of one eval.py run, from its config.yaml and metrics.json: ANSWER_SETTINGS, then
    "prompt" and "parser" where eval.py recorded them (answer_code), then "test split <set>" for each
    sha256 in split_hashes ({set name: sha256}). A setting the run did not record is left out."""
    settings = {key: config[key] for key in ANSWER_SETTINGS if key in config}
    settings.update(metrics.get("answer_code") or {})
    settings.update({f"test split {name}": sha for name, sha in (split_hashes or {}).items() if sha})
    return settings


def settings_warnings(settings: dict[str, dict]) -> list[str]:
    """{run name: eval_settings} -> one warning (markdown) per setting that differs between the runs that
    recorded it, and one per setting some runs recorded and others did not. [] when all agree."""
    keys = list(dict.fromkeys(k for s in settings.values() for k in s))
    warnings = []
    for key in keys:
        values = {name: s[key] for name, s in settings.items() if key in s}
        if len(set(map(str, values.values()))) > 1:
            shown = ", ".join(f"{name}: {_short(v)}" for name, v in values.items())
            warnings.append(f"**{key} differs between runs** ({shown}): their accuracies are not measured alike.")
        missing = [name for name in settings if key not in settings[name]]
        if missing and key not in ANSWER_SETTINGS:
            warnings.append(f"**{key} not recorded** for {', '.join(missing)} (evaluated before it was recorded): "
                            f"whether it matches the other runs' is unknown.")
    return warnings


def _short(value) -> str:
    """A sha256 shown by its first 12 hex digits; anything else as it is."""
    return value[:12] if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{16,64}", value) else str(value)
