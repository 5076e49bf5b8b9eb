"""Configs: YAML file -> typed dataclass -> `key=value` overrides from the command line.

    python train_grpo.py configs/grpo.yaml lr=1e-6 group_size=8

Every key is read once, here; scripts get a `cfg` an editor can follow. An unknown key or a value
of the wrong type stops the run with a message naming the key and the file it came from.
"""

import dataclasses
import difflib
import os
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
    return getattr(tp, "__name__", str(tp))


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
            value = yaml.safe_load(value)
        if not isinstance(value, origin):
            raise ConfigError(f"{source}: key '{key}' must be a {origin.__name__}, got {value!r}")
        return value
    if isinstance(value, str) and tp is float:
        try:
            return float(value)  # YAML 1.1 reads "3e-6" (no dot) as a string
        except ValueError:
            raise ConfigError(f"{source}: key '{key}' must be a float, got {value!r}") from None
    if isinstance(value, str) and tp is not str:
        # command-line overrides arrive as strings; YAML's parser gives them their natural type
        value = yaml.safe_load(value)
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
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{key}'{hint}")
        setattr(cfg, key, _coerce(value, hints[key], key, source))


def load_config(cls, path: str | None, overrides: list[str] = ()):
    """Defaults of `cls`, then the YAML file, then each `key=value` in order."""
    cfg = cls()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
        _apply(cfg, data, path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: expected key=value, got '{item}'")
        key, value = item.split("=", 1)
        _apply(cfg, {key.strip(): value}, "command line")
    if not cfg.collective_timeout > 0:
        raise ConfigError(f"collective_timeout must be a positive number of seconds, got {cfg.collective_timeout}")
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
           "parse_args", "save_config", "InputError", "MissingInput", "BadInput", "check_inputs", "check_split"]


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
        if self.judge not in ("none", "api", "self", "rule"):
            raise ConfigError(f"judge must be none, api, self or rule, got '{self.judge}'")
        for key in ("judge_timeout", "judge_deadline"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be a positive number of seconds, got {getattr(self, key)}")
        if not 0 <= self.judge_max_failure_share <= 1:
            raise ConfigError(f"judge_max_failure_share must be between 0 and 1, got {self.judge_max_failure_share}")
        for key in ("judge_failure_window", "judge_concurrency"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.judge_max_retries < 0:
            raise ConfigError(f"judge_max_retries must be 0 or more, got {self.judge_max_retries}")


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

    def validate(self):
        from evaluation import IMAGE_CONTROLS

        for control in self.image_controls:
            if control not in IMAGE_CONTROLS:
                raise ConfigError(f"key 'image_controls': unknown control {control!r}; "
                                  f"allowed: {', '.join(IMAGE_CONTROLS)}")
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
        if self.finetune not in ("lora", "full"):
            raise ConfigError(f"finetune must be lora or full, got '{self.finetune}'")
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
    rewards: dict = field(default_factory=lambda: {"format": 1.0, "accuracy": 1.0})
    accuracy_requires_format: bool = False
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
        if self.group_size < 2:
            raise ConfigError(f"group_size must be at least 2, got {self.group_size}: advantages compare the "
                              "completions of one prompt with each other")
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
        if self.max_sampling_rounds < 1:
            raise ConfigError(f"max_sampling_rounds must be at least 1, got {self.max_sampling_rounds}")
        if self.merge_for_sampling not in (True, False, "auto"):
            raise ConfigError(f"merge_for_sampling must be true, false or auto, got {self.merge_for_sampling!r}")
        if self.reference not in ("sft", "base", "none"):
            raise ConfigError(f"reference must be sft, base or none, got '{self.reference}'")
        if self.reference == "sft" and self.init_adapter is None and self.kl_coef != 0:
            raise ConfigError("reference=sft needs init_adapter (the SFT adapter); or use reference=base")
        if self.reference == "none" and self.kl_coef != 0:
            raise ConfigError("reference=none needs kl_coef=0")
        if "process" in self.rewards and self.judge == "none":
            raise ConfigError("the process reward needs a judge: judge=api | self | rule")
        judge_wait = self.judge_deadline * (self.max_sampling_rounds if self.dynamic_sampling else 1)
        if "process" in self.rewards and self.judge == "api" and self.collective_timeout <= judge_wait + 60:
            raise ConfigError(f"collective_timeout={self.collective_timeout:g} s must exceed the judge's longest wait "
                              f"in a step ({judge_wait:g} s: judge_deadline x batches of judge requests) by a "
                              "minute, or one process's slow judge stops every process: raise collective_timeout "
                              "or lower judge_deadline")
        for key, allowed in [("loss_type", ("grpo", "bnpo", "dapo", "dr_grpo")),
                             ("scale_rewards", ("group", "batch", "none"))]:
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got '{getattr(self, key)}'")


# ----------------------------------------------------------------------------------------------
# Inputs a config names, checked before any model loads: a missing split found after a 16 GB download
# (or minutes of loading) is a run lost. The model name itself is checked by model.check_model.

class InputError(Exception):
    """A file, directory, model or variable the config names is missing or unusable. Its message names
    the key and the path; the scripts print it alone (a traceback would only bury it)."""


class MissingInput(InputError, FileNotFoundError):
    pass


class BadInput(InputError, ValueError):
    pass


def check_inputs(cfg):
    """Everything a script's config points at: output_dir can be made, every split parses and every record
    (image included) is usable, adapter directories hold an adapter, judge=api has its key."""
    check_output_dir(cfg.output_dir)
    if isinstance(cfg, EvalConfig):
        for spec in cfg.sets:  # a malformed spec is evaluation.load_sets' to name
            name, sep, path = spec.partition("=")
            if sep and path.strip():
                check_split(f"sets ({name.strip()})", path.strip())
        check_adapter("adapter", cfg.adapter)
    else:
        check_split("data", cfg.data)
        if cfg.eval_data and (isinstance(cfg, SFTConfig) or cfg.eval_every):  # GRPO reads it only to evaluate
            check_split("eval_data", cfg.eval_data)
        # train_grpo.py takes a finetune=full SFT model as its base (the demo's path)
        check_adapter("init_adapter", cfg.init_adapter, full_model_ok=isinstance(cfg, GRPOConfig))
    if getattr(cfg, "judge", "none") == "api" and not os.environ.get(cfg.judge_api_key_env):
        raise BadInput(f"judge=api reads its key from the environment variable {cfg.judge_api_key_env}, which is not "
                       f"set: export {cfg.judge_api_key_env}=... (or judge=self | rule)")


def check_output_dir(path: str):
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        raise BadInput(f"key 'output_dir': {existing} is a file, so output_dir={path} cannot be a directory")


def check_split(key: str, path: str):
    """A prepared JSONL split as a training or test set: each record as the data preparers leave it
    (mcq.check_record: unique id, a question, >= 2 options, the answer among them, an image that opens)."""
    from mcq import check_record, load_split

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
    missing = [r for r in records if not os.path.isfile(os.path.join(root, r.image))]
    if missing:
        example = os.path.join(root, missing[0].image)
        raise MissingInput(f"key '{key}': {path}: {len(missing)} images missing, e.g. {example} (record "
                           f"'{missing[0].id}'); re-run the data preparation")
    seen, bad = set(), []
    for r in records:
        reason = check_record(r, root, seen)
        seen.add(r.id)
        if reason:
            bad.append(f"'{r.id}': {reason}")
    if bad:
        raise BadInput(f"key '{key}': {path}: {len(bad)} of {len(records)} records cannot be used ({'; '.join(bad[:3])}"
                       f"{' ...' if len(bad) > 3 else ''}); the data preparers drop such records (and list them in "
                       "report.json): re-run the preparation or fix the file")


def check_adapter(key: str, path: str | None, full_model_ok: bool = False):
    if path is None or os.path.isfile(os.path.join(path, "adapter_config.json")):
        return
    if os.path.isfile(os.path.join(path, "config.json")):
        if full_model_ok:
            return
        raise MissingInput(f"key '{key}': {path} holds a whole model, not a LoRA adapter: give it as model={path}")
    what = "does not exist" if not os.path.exists(path) else "has no adapter_config.json"
    raise MissingInput(f"key '{key}': {path} {what} (give the output_dir of a finished train_sft.py / "
                       "train_grpo.py run)")
