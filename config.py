"""Configs: YAML file -> typed dataclass -> `key=value` overrides from the command line.

    python train_grpo.py configs/grpo.yaml lr=1e-6 group_size=8

Every key is read once, here; scripts get a `cfg` an editor can follow. An unknown key, a value of the
wrong type, outside its range (RANGES) or not among its allowed values (CHOICES), a key written twice in
a YAML file, or a file that is not YAML stops the run with one message naming the key and the file.
"""

import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    """Keys shared by every script: which model, how it is loaded, and the LoRA adapter."""

    model: str = "tiny"  # hub id, local directory, `tiny` (a few MB) or `tiny-small` (3.2M params)
    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto = cuda if available, else cpu (refused for models over 1B parameters)
    dtype: str = "auto"  # auto = bf16 on GPU (fp32 on GPUs without bf16), fp32 on CPU
    quantization: str = "none"  # none | 4bit (NF4, double quant) | 8bit
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112  # the paper's 7B runs use larger images: see configs/*.yaml
    gradient_checkpointing: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    backend: str = "hf"  # hf | unsloth (GPU only, optional)
    # under torchrun: how long a process waits for the others at a collective before the run stops. A step's
    # work outside collectives must fit in it: with a judge, up to judge_deadline per batch of judge requests
    collective_timeout: float = 600.0


def _type_name(tp) -> str:
    return {float: "a number", str: "a string"}.get(tp) or getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str, source: str):
    """Check (and, for strings from the command line, parse) one value against its field type."""
    origin = typing.get_origin(tp) or (tp if tp in (list, dict) else None)
    if origin in (typing.Union, types.UnionType):  # `str | None`
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: key '{key}' must be {tp}, got {value!r}")
    if origin in (list, dict):
        if isinstance(value, str):
            value = _parse_yaml(value, f"{source}: key '{key}'", with_line=False)
        if not isinstance(value, origin):
            raise ConfigError(f"{source}: key '{key}' must be a {origin.__name__}, got {value!r}")
        args = typing.get_args(tp)
        if origin is list and args:  # list[str]: each item
            return [_coerce(item, args[0], f"{key}[{i}]", source) for i, item in enumerate(value)]
        if origin is dict and args:  # dict[str, float]: each name and value, named key.name
            return {_coerce(k, args[0], key, source): _coerce(v, args[1], f"{key}.{k}", source)
                    for k, v in value.items()}
        return value
    if isinstance(value, str) and tp is float:
        try:
            return float(value)  # YAML 1.1 reads "3e-6" (no dot) as a string
        except ValueError:
            raise ConfigError(f"{source}: key '{key}' must be a number, got {value!r}") from None
    if isinstance(value, str) and tp is not str:
        # command-line overrides arrive as strings; YAML's parser gives them their natural type
        value = _parse_yaml(value, f"{source}: key '{key}'", with_line=False)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: key '{key}' must be true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{source}: key '{key}' must be an int, got {value!r}")
    if tp is str and not isinstance(value, str):
        value = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(value, tp):
        raise ConfigError(f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def _apply(cfg, updates: dict, source: str):
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    for key, value in updates.items():
        key = str(key)  # YAML reads `1: x` as an int key
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{_shown(key)}'{hint}")
        value = _coerce(value, hints[key], key, source)
        check_value(key, value, source)  # now, while we know which file or argument it came from
        setattr(cfg, key, value)


def load_config(cls, path: str | None, overrides: list[str] = ()):
    """Defaults of `cls`, then the YAML file, then each `key=value` in order."""
    cfg = cls()
    if path is not None:
        data = _read_yaml_file(path)
        if data is None:  # an empty file (or only comments)
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
        _apply(cfg, data, path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: expected key=value, got '{_shown(item)}'")
        key, value = item.split("=", 1)
        _apply(cfg, {key.strip(): value}, "command line")
    if cfg.min_pixels > cfg.max_pixels:
        raise ConfigError(f"min_pixels={cfg.min_pixels} exceeds max_pixels={cfg.max_pixels}: the processor resizes "
                          "every image to between the two; lower min_pixels or raise max_pixels")
    if isinstance(cfg, JudgeConfig):
        cfg.validate_judge()
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def parse_args(cls, argv: list[str] | None = None):
    """`script.py [config.yaml] [key=value ...]` -> cfg. Exits with the message on a bad config."""
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path else argv
    try:
        return load_config(cls, path, overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def save_config(cfg, output_dir: str, name: str = "config.yaml"):
    """The resolved config beside the run's outputs, so a run can always be repeated."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, name), "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)


__all__ = ["ConfigError", "ModelConfig", "JudgeConfig", "EvalConfig", "SFTConfig", "GRPOConfig", "load_config",
           "parse_args", "save_config", "CHOICES", "RANGES", "check_value"]


# ----------------------------------------------------------------------------------------------
# What each key may hold: checked as the key is read (the message names the file or the command line), so
# a bad value stops the run before anything loads, not at step 1. A new key with a set of values or a range
# gets one line here; tests/test_config.py fails for a numeric or enumerated key that has none.

def _reward_names():
    from rewards import REWARDS  # read when checked (a test may add a reward); rewards -> judges imports config

    return tuple(REWARDS)


def _image_controls():
    from evaluation import IMAGE_CONTROLS

    return IMAGE_CONTROLS


# key -> its allowed values (for a dict its names, for a list its items). "cuda:N": cuda:0, cuda:1, ...
CHOICES = {
    "device": ("auto", "cpu", "cuda", "cuda:N"),
    "dtype": ("auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"),
    "quantization": ("none", "4bit", "8bit"),
    "attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "backend": ("hf", "unsloth"),
    "judge": ("none", "api", "self", "rule"),
    "optimizer": ("adamw", "adamw_8bit", "paged_adamw_8bit"),
    "lr_schedule": ("cosine", "constant"),
    "finetune": ("lora", "full"),
    "reference": ("sft", "base", "none"),
    "loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
    "scale_rewards": ("group", "batch", "none"),
    "merge_for_sampling": (True, False, "auto"),
    "open_answer_reward": ("exact", "f1", "judged"),
    "rewards": _reward_names,
    "image_controls": _image_controls,
}

# key -> the interval its number must lie in: [ ] includes the bound, ( ) excludes it. A float must also be
# finite (nan and inf are refused) unless its interval ends in "inf]".
RANGES = {
    # ModelConfig
    "seed": "[0, 2147483647]", "min_pixels": "[1, inf)", "max_pixels": "[1, inf)", "lora_r": "[1, inf)",
    "lora_alpha": "[1, inf)", "lora_dropout": "[0, 1)", "collective_timeout": "(0, inf)",
    # JudgeConfig
    "judge_concurrency": "[1, inf)", "judge_timeout": "(0, inf)", "judge_max_retries": "[0, inf)",
    "judge_deadline": "(0, inf)", "judge_max_failure_share": "[0, 1]", "judge_failure_window": "[1, inf)",
    # EvalConfig, TrainConfig, SFTConfig
    "batch_size": "[1, inf)", "max_new_tokens": "[1, inf)", "limit": "[0, inf)", "max_steps": "[1, inf)",
    "lr": "(0, inf)", "weight_decay": "[0, inf)", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)",
    "warmup_steps": "[0, inf)", "grad_clip": "(0, inf]", "save_every": "[0, inf)", "keep_checkpoints": "[0, inf)",
    "eval_items": "[0, inf)", "eval_every": "[0, inf)", "grad_accum": "[1, inf)", "max_len": "[1, inf)",
    # GRPOConfig
    "num_prompts": "[1, inf)", "group_size": "[2, inf)", "max_prompt_len": "[1, inf)", "temperature": "(0, inf)",
    "top_p": "(0, 1]", "max_sampling_rounds": "[1, inf)", "clip_eps": "(0, 1)", "clip_eps_high": "(0, inf)",
    "kl_coef": "[0, inf)", "num_iterations": "[1, inf)", "micro_batch_size": "[1, inf)", "logprob_chunk": "[1, inf)",
    "sample_every": "[0, inf)", "log_groups": "[0, inf)", "max_bad_steps": "[1, inf)",
}

# why a range is what it is, where the bound alone does not say
WHY = {
    "group_size": "advantages compare the completions of one prompt with each other",
    "temperature": "GRPO samples its groups from softmax(logits / T): at T=0 sampling is greedy, a group's "
                   "completions are all alike and the log-probs divide by zero",
    "grad_clip": "the largest gradient norm (inf: no clipping; 0 would zero every update)",
    "max_steps": "fewer would save the untrained starting point as the result",
    "clip_eps": "the ratio is clipped to [1 - ε, 1 + ε]",
    "seed": "numpy takes seeds below 2^32 (each process adds 1000 x its rank)",
}

MAY_BE_EMPTY = {"run_name"}  # "" = its default; every other string key must say something


def _shown(text: str) -> str:
    """A command-line word as a message may quote it: one that may be a pasted secret is not shown."""
    secret = text.startswith(("sk-", "hf_", "ghp_")) or (len(text) >= 32 and re.fullmatch(r"[\w\-.]+", text)
                                                        and not re.search(r"[/=]|\.ya?ml$", text))
    return "<a value that looks like a secret, not shown>" if secret else text


def _looks_like_variable_name(text: str) -> bool:
    """OPENAI_API_KEY, HF_TOKEN, my_key: a name in one case; not sk-..., not 40 random letters and digits."""
    return (re.fullmatch(r"[A-Z_][A-Z0-9_]{0,63}|[a-z_][a-z0-9_]{0,63}", text) is not None
            and ("_" in text or len(text) <= 16))


def _allowed(value, choice) -> bool:
    if isinstance(choice, str) and choice.endswith(":N"):
        return isinstance(value, str) and re.fullmatch(re.escape(choice[:-1]) + r"\d+", value) is not None
    return value == choice and type(value) is type(choice)  # True is not "true", 1 is not True


def _in_range(value, spec: str) -> bool:
    low_bracket, low, high, high_bracket = re.fullmatch(r"([\[(])(.+), (.+)([\])])", spec).groups()
    low, high = float(low), float(high)
    if math.isnan(value):
        return False
    return ((low <= value if low_bracket == "[" else low < value)
            and (value <= high if high_bracket == "]" else value < high))


def _describe(spec: str, value) -> str:
    """"[1, inf)" -> "at least 1" (an int), "(0, inf)" -> "a finite number > 0", "[0, 1]" -> "a number between 0
    and 1"."""
    low_bracket, low, high, high_bracket = re.fullmatch(r"([\[(])(.+), (.+)([\])])", spec).groups()
    if isinstance(value, int) and low_bracket == "[" and high == "inf":
        return f"at least {low}"
    if isinstance(value, int):
        noun = "an int"
    else:
        noun = "a finite number" if high == "inf" and high_bracket == ")" else "a number"
    if low_bracket == "[" and high_bracket == "]" and high != "inf":
        return f"{noun} between {low} and {high}"
    bounds = [f"{'>=' if low_bracket == '[' else '>'} {low}"]
    if high != "inf":
        bounds.append(f"{'<=' if high_bracket == ']' else '<'} {high}")
    return f"{noun} {' and '.join(bounds)}"


def check_value(key: str, value, source: str):
    """One key's value against MAY_BE_EMPTY, CHOICES and RANGES -> ConfigError naming the key and the source."""
    where = f"{source}: key '{key}'"
    if value is None:  # a `str | None` key left at none
        return
    if isinstance(value, str) and not value.strip() and key not in MAY_BE_EMPTY:
        raise ConfigError(f"{where} is empty: give it a value, or leave it out for its default")
    if key == "judge_api_key_env" and not _looks_like_variable_name(value):  # never echo it: it may be the key
        raise ConfigError(f"{where} must name an environment variable (like OPENAI_API_KEY), not hold the key "
                          "itself: export the key as that variable and give its name (the value given is not shown)")
    choices = CHOICES.get(key)
    if choices is not None:
        choices = choices() if callable(choices) else choices
        shown = ", ".join(str(c).lower() if isinstance(c, bool) else c for c in choices)
        for item in value if isinstance(value, (list, dict)) else [value]:
            if not any(_allowed(item, c) for c in choices):
                close = difflib.get_close_matches(str(item), [str(c) for c in choices], n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                if isinstance(value, (list, dict)):
                    noun = {"rewards": "reward", "image_controls": "control"}.get(key, "name")
                    raise ConfigError(f"{where}: unknown {noun} {item!r}; allowed: {shown}{hint}")
                raise ConfigError(f"{where} must be one of {shown}; got {item!r}{hint}")
    numbers = value.items() if isinstance(value, dict) else [(None, value)]
    for name, number in numbers:
        if isinstance(number, float) and not math.isfinite(number) and not (name is None and key in RANGES):
            shown_key = f"{key}.{name}" if name else key
            raise ConfigError(f"{source}: key '{shown_key}' must be a finite number, got {number!r}")
    if key in RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not _in_range(value, RANGES[key]):
            why = f": {WHY[key]}" if key in WHY else ""
            raise ConfigError(f"{where} must be {_describe(RANGES[key], value)}, got {value!r}{why}")


# ----------------------------------------------------------------------------------------------
# YAML: PyYAML's safe loader (plain values only, never Python objects), refusing a key written twice in one
# mapping, which PyYAML would otherwise resolve silently by keeping the last

class _StrictLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader, node, deep=False):
    first_line = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` is meant to be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (first on line {first_line[key] + 1}) and YAML would keep "
                    "only the last: delete one", key_node.start_mark)
            first_line[key] = key_node.start_mark.line
        except TypeError:  # an unhashable key: construct_mapping says so
            pass
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, where: str, with_line: bool = True):
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if with_line and mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        tag = re.search(r"constructor for the tag '(.+?)'", problem)
        if tag:
            problem = (f"the tag {tag.group(1).replace('tag:yaml.org,2002:', '!!')} is not read: a config holds plain "
                       "values (numbers, strings, lists, mappings), never Python objects")
        elif not isinstance(e, yaml.constructor.ConstructorError):
            problem = f"not valid YAML: {problem}"
        raise ConfigError(f"{where}{line}: {problem}") from None


def _read_yaml_file(path: str):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {_shown(path)}" + (" (a directory)" if os.path.isdir(path) else ""))
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte {raw[e.start]:#x}): save the file as "
                          "UTF-8") from None
    return _parse_yaml(text, path)


@dataclass
class JudgeConfig:
    """Keys of the judge (judges.judge_from_config): GRPO's process reward, eval.py's reasoning quality."""

    judge: str = "none"  # none | api | self | rule
    judge_base_url: str = "https://api.openai.com/v1"
    judge_model: str = "gpt-4o"
    judge_api_key_env: str = "OPENAI_API_KEY"  # name of the variable; the key never enters a config
    judge_concurrency: int = 8
    judge_timeout: float = 60.0  # seconds per API request
    judge_max_retries: int = 4  # on 429 / 5xx / timeouts / malformed replies, with exponential back-off
    # the longest one batch of judge requests may take, retries and back-off included: what a dead or hanging
    # judge can add to a step. Requests still unanswered then are failures (scored by the fallback)
    judge_deadline: float = 120.0
    judge_cache_dir: str | None = None  # default: ~/.cache/pathvlm-r1/judge
    # a judge that is down must not silently turn the process reward into its fallback: the run stops (GRPO
    # with a checkpoint, eval with an error) once more than this share of the last judge_failure_window
    # verdicts failed (no reply, or a reply that is not a verdict). 1 = never stop
    judge_max_failure_share: float = 0.5
    judge_failure_window: int = 64

    def validate_judge(self):
        """The judge keys against CHOICES and RANGES: load_config checks each as it is read; this checks a
        config built in code."""
        for f in dataclasses.fields(JudgeConfig):
            check_value(f.name, getattr(self, f.name), "config")


@dataclass
class EvalConfig(JudgeConfig, ModelConfig):
    adapter: str | None = None  # LoRA adapter directory; none = the base model
    # test sets as name=path-to-jsonl; the first one gives the top-level `accuracy`
    sets: list[str] = field(default_factory=lambda: ["demo=data/demo/prepared/test.jsonl"])
    batch_size: int = 16
    max_new_tokens: int = 256
    limit: int = 0  # evaluate only the first N items of each set (0 = all)
    run_name: str = ""  # label in reports; default: the output_dir's name
    # image-reliance controls, each answered beside the real images (evaluation.control_sets): blank (a
    # mid-grey image of the same size) and/or shuffled (another item's image of the set, seeded by seed).
    # A model that reads the image falls to chance on both; each costs as much generation as the real set
    image_controls: list[str] = field(default_factory=list)

    def validate(self):  # each control is checked against evaluation.IMAGE_CONTROLS by CHOICES
        if len(set(self.image_controls)) < len(self.image_controls):
            raise ConfigError(f"key 'image_controls' names a control twice: {self.image_controls}")


@dataclass
class TrainConfig(ModelConfig):
    """Keys shared by the two training scripts: optimisation, logging, checkpoints."""

    init_adapter: str | None = None  # start from this LoRA adapter (e.g. the SFT output_dir)
    max_steps: int = 100
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | constant (after warmup)
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit (bitsandbytes; for GPUs)
    save_every: int = 100  # steps between checkpoints (0 = only at the end and on Ctrl-C)
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (newest checkpoint in output_dir) | none | a checkpoint directory
    tensorboard: bool = False


@dataclass
class SFTConfig(TrainConfig):
    data: str = "data/demo/prepared/sft.jsonl"
    eval_data: str | None = "data/demo/prepared/test.jsonl"  # held-out loss; none to skip
    eval_items: int = 64
    eval_every: int = 50
    finetune: str = "lora"  # lora | full (every language-model weight: the authors' own stage 1)
    train_vision: bool = False  # the paper keeps the vision tower frozen
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_len: int = 2048  # longer examples are dropped (never cut: cutting image tokens breaks the model)
    merge_export: bool = False  # also write output_dir/merged: base + adapter as one model (for vLLM etc.)

    def validate(self):
        if self.eval_data is not None and (self.eval_every < 1 or self.eval_items < 1):
            raise ConfigError(f"eval_every={self.eval_every}, eval_items={self.eval_items}: SFT computes the held-out "
                              "loss on eval_items items every eval_every steps, so both must be at least 1 (for no "
                              "held-out loss: eval_data=none)")
        if self.backend == "unsloth" and (self.finetune == "full" or self.train_vision):
            raise ConfigError("backend=unsloth trains LoRA on the language model only: use backend=hf for "
                              "finetune=full or train_vision=true")
        if self.finetune == "full" and self.init_adapter is not None:  # load_model would ignore it
            raise ConfigError("init_adapter continues a LoRA run (finetune=lora); to go on from a finetune=full "
                              "model, set model= to its directory")
        if self.finetune == "full" and self.quantization != "none":
            raise ConfigError("finetune=full trains the weights themselves: use quantization=none")


@dataclass
class GRPOConfig(JudgeConfig, TrainConfig):
    data: str = "data/demo/prepared/rl.jsonl"
    eval_data: str | None = None  # a held-out split answered greedily every eval_every steps
    eval_every: int = 0  # 0 = never
    eval_items: int = 0  # its first N items (0 = all)
    reference: str = "sft"  # sft (init_adapter as a frozen 2nd adapter) | base (adapters disabled) | none
    # group sampling
    num_prompts: int = 8  # B: prompts per step
    group_size: int = 4  # G: completions per prompt
    max_prompt_len: int = 1024  # longer prompts are dropped and counted (never cut inside the image)
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0  # < 1: the sampler truncates, the log-prob passes score the full softmax (as TRL)
    # rewards: name -> weight (rewards.REWARDS); the paper sums them with equal weight
    rewards: dict[str, float] = field(default_factory=lambda: {"format": 1.0, "accuracy": 1.0})
    accuracy_requires_format: bool = False
    # the accuracy reward on an open question (no options; rewards.open_answer_reward_scores): exact (after
    # openqa.normalise) | f1 (token F1, partial credit) | judged (equivalence by the judge: api | self | rule)
    open_answer_reward: str = "exact"
    # objective (grpo.py)
    scale_rewards: str = "group"  # group | batch | none
    skip_equal_groups: bool = False  # drop groups whose rewards are all equal (their advantage is 0)
    # DAPO's dynamic sampling: draw more prompts until num_prompts groups have rewards that differ, at most
    # max_sampling_rounds draws a step (then the step goes on with what it has, and logs groups_short)
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
    clip_eps: float = 0.2  # ε
    clip_eps_high: float | None = None  # ε_high (DAPO's clip-higher); none = ε
    kl_coef: float = 0.04  # β; 0 skips the reference pass
    num_iterations: int = 1  # μ: policy updates per batch of samples
    mask_truncated: bool = False  # completions that hit max_new_tokens get no loss
    # memory and logging
    micro_batch_size: int = 8  # completions per log-prob forward/backward pass
    # fold LoRA into the weights while sampling (unquantised bases only); auto = on CPU only: the exact
    # restore afterwards holds a copy of every adapted layer (~13 GB for the 7B in bf16)
    merge_for_sampling: bool | str = "auto"
    logprob_chunk: int = 1024  # tokens per vocab-projection chunk
    sample_every: int = 10  # write sample completions every N steps
    log_groups: int = 2  # ... of this many groups (0 = every group of the step: to study what a run learns)
    max_bad_steps: int = 5  # stop (with a checkpoint) after this many NaN/inf steps in a row

    def validate(self):
        if not self.rewards or not any(self.rewards.values()):
            raise ConfigError(f"rewards={self.rewards}: name at least one reward with a weight other than 0, e.g. "
                              "rewards={format: 1, accuracy: 1}; with none every advantage is 0 and nothing is learnt")
        if self.lora_dropout != 0:
            raise ConfigError(f"lora_dropout must be 0 in GRPO, got {self.lora_dropout}: the policy pass (train "
                              "mode) and the sampling, old and reference passes (eval mode) must be one network, or "
                              "dropout noise alone gives KL > 0 and ratios != 1")
        if self.backend == "unsloth":
            # Unsloth's generate forces a static KV cache, and rollout.generate_groups hands generate a cache
            # already filled with the group's shared prompt: transformers refuses the pair at the first step.
            # Its loader also places every torchrun process on GPU 0. Refused here rather than there.
            raise ConfigError("backend=unsloth is for SFT only: GRPO samples each group from one shared prompt "
                              "cache, which Unsloth's static-cache generate cannot take; use backend=hf for GRPO "
                              "(4-bit QLoRA works there: quantization=4bit)")
        if self.reference == "sft" and self.init_adapter is None and self.kl_coef != 0:
            raise ConfigError("reference=sft needs init_adapter (the SFT adapter); or use reference=base")
        if self.reference == "none" and self.kl_coef != 0:
            raise ConfigError("reference=none needs kl_coef=0")
        if "process" in self.rewards and self.judge == "none":
            raise ConfigError("the process reward needs a judge: judge=api | self | rule")
        judged = self.open_answer_reward == "judged" and "accuracy" in self.rewards
        if judged and self.judge == "none":
            raise ConfigError("open_answer_reward=judged needs a judge to say whether an open answer means the "
                              "reference: judge=api | self | rule (or open_answer_reward=exact | f1)")
        judge_wait = self.judge_deadline * (self.max_sampling_rounds if self.dynamic_sampling else 1)
        if ("process" in self.rewards or judged) and self.judge == "api" and self.collective_timeout <= judge_wait + 60:
            raise ConfigError(f"collective_timeout={self.collective_timeout:g} s must exceed the judge's longest wait "
                              f"in a step ({judge_wait:g} s: judge_deadline x batches of judge requests) by a "
                              "minute, or one process's slow judge stops every process: raise collective_timeout "
                              "or lower judge_deadline")
