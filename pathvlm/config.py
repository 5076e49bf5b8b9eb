"""Configs: YAML file -> typed dataclass -> `key=value` overrides from the command line.

    python train_grpo.py configs/grpo.yaml lr=1e-6 group_size=8

Every key is read once, here; scripts get a `cfg` an editor can follow. An unknown key, a value of the
wrong type, outside its range or not among its allowed values (allowed.py's RANGES and CHOICES), a key
written twice in a YAML file, or a file that is not YAML stops the run with one message naming the key and
the file.
"""

import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field

import yaml

from pathvlm.allowed import CHOICES, RANGES, ConfigError, _parse_yaml, _read_yaml_file, _shown, check_value, quoted


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
        raise ConfigError(f"{source}: key '{key}' must be {tp}, got {quoted(value)}")
    if origin in (list, dict):
        if isinstance(value, str):
            value = _parse_yaml(value, f"{source}: key '{key}'", with_line=False)
        if not isinstance(value, origin):
            raise ConfigError(f"{source}: key '{key}' must be a {origin.__name__}, got {quoted(value)}")
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
            raise ConfigError(f"{source}: key '{key}' must be a number, got {quoted(value)}") from None
    if isinstance(value, str) and tp is not str:
        # command-line overrides arrive as strings; YAML's parser gives them their natural type
        value = _parse_yaml(value, f"{source}: key '{key}'", with_line=False)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: key '{key}' must be true or false, got {quoted(value)}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{source}: key '{key}' must be an int, got {quoted(value)}")
    if tp is str and not isinstance(value, str):
        value = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(value, tp):
        raise ConfigError(f"{source}: key '{key}' must be {_type_name(tp)}, got {quoted(value)}")
    return value


def _apply(cfg, updates: dict, source: str, names: dict | None = None):
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    for key, value in updates.items():
        key = str(key)  # YAML reads `1: x` as an int key
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{_shown(key)}'{hint}")
        value = _coerce(value, hints[key], key, source)
        check_value(key, value, source, names)  # now, while we know which file or argument it came from
        setattr(cfg, key, value)


def load_config(cls, path: str | None, overrides: list[str] = (), names: dict | None = None):
    """Defaults of `cls`, then the YAML file, then each `key=value` in order. names: key -> the values it may
    take where a module above this one owns them (train_grpo.py: {"rewards": rewards.REWARDS})."""
    cfg = cls()
    if path is not None:
        data = _read_yaml_file(path)
        if data is None:  # an empty file (or only comments)
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
        _apply(cfg, data, path, names)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: expected key=value, got '{_shown(item)}'")
        key, value = item.split("=", 1)
        _apply(cfg, {key.strip(): value}, "command line", names)
    expand_paths(cfg)
    if cfg.min_pixels > cfg.max_pixels:
        raise ConfigError(f"min_pixels={cfg.min_pixels} exceeds max_pixels={cfg.max_pixels}: the processor resizes "
                          "every image to between the two; lower min_pixels or raise max_pixels")
    if isinstance(cfg, JudgeConfig):
        cfg.validate_judge()
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


PATH_KEYS = ("model", "output_dir", "data", "eval_data", "adapter", "init_adapter", "resume", "judge_cache_dir")
_UNSET_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_paths(cfg):
    """`~` and `$VAR` in every path key (and each path of `sets`), as a shell would have: otherwise
    output_dir: $HOME/x makes a folder named `$HOME` and data: ~/x is "not found". A variable that is not set
    stops the run, named: expanded to nothing it would put the run somewhere else."""
    def expand(key: str, value: str) -> str:
        value = os.path.expanduser(os.path.expandvars(value))
        unset = _UNSET_VARIABLE.search(value)
        if unset:
            raise ConfigError(f"key '{key}': {_shown(value)} names the environment variable {unset.group(0)}, which "
                              "is not set: set it, or write the path out")
        return value

    for key in PATH_KEYS:
        if isinstance(getattr(cfg, key, None), str):
            setattr(cfg, key, expand(key, getattr(cfg, key)))
    if isinstance(getattr(cfg, "sets", None), list):  # name=path
        cfg.sets = [f"{s.partition('=')[0]}={expand('sets', s.partition('=')[2])}" if "=" in s else s
                    for s in cfg.sets]


def parse_args(cls, argv: list[str] | None = None, names: dict | None = None):
    """`script.py [config.yaml] [key=value ...]` -> cfg. Exits with the message on a bad config."""
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path else argv
    try:
        return load_config(cls, path, overrides, names)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def save_config(cfg, output_dir: str, name: str = "config.yaml"):
    """The resolved config beside the run's outputs, so a run can always be repeated."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, name), "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)


__all__ = ["ConfigError", "ModelConfig", "JudgeConfig", "EvalConfig", "SFTConfig", "GRPOConfig", "load_config",
           "parse_args", "save_config", "CHOICES", "RANGES", "check_value"]


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
class SamplerConfig:
    """Keys of whatever generates: GRPO's rollouts, eval.py's greedy answers, the self-judge (sampler.py)."""

    sampler: str = "static"  # static (sampler.py: a cache allocated once, fixed-shape steps) | hf (generate)
    # record the static sampler's decode step as a CUDA graph and replay it: auto = on CUDA only
    cuda_graph: bool | str = "auto"

    def validate_sampler(self):
        if self.sampler == "static" and self.attn_implementation == "flash_attention_2":
            raise ConfigError("sampler=static passes its own attention mask, which flash_attention_2 does not take: "
                              "use attn_implementation=sdpa, or sampler=hf")
        if self.sampler == "static" and self.backend == "unsloth":
            raise ConfigError("sampler=static runs the model's own layers, which Unsloth replaces: use sampler=hf "
                              "with backend=unsloth")


@dataclass
class EvalConfig(JudgeConfig, SamplerConfig, ModelConfig):
    adapter: str | None = None  # LoRA adapter directory; none = the base model
    # test sets as name=path-to-jsonl; the first one gives the top-level `accuracy`
    sets: list[str] = field(default_factory=lambda: ["demo=data/demo/prepared/test.jsonl"])
    batch_size: int = 16
    max_new_tokens: int = 256
    limit: int = 0  # evaluate only the first N items of each set (0 = all)
    # items whose prompt (image tokens included) is longer are skipped and counted, as training drops them, where a
    # 50 MB question would exhaust memory. Ours: configs/eval.yaml's max_pixels allows 1,280 image tokens (1003520 /
    # 28²), so 8192 leaves ~6,900 for the text
    max_prompt_len: int = 8192
    run_name: str = ""  # label in reports; default: the output_dir's name
    # image-reliance controls, each answered beside the real images (evaluation.control_sets): blank (a
    # mid-grey image of the same size) and/or shuffled (another item's image of the set, seeded by seed).
    # A model that reads the image falls to chance on both; each costs as much generation as the real set
    image_controls: list[str] = field(default_factory=list)

    def validate(self):  # each control is checked against allowed.IMAGE_CONTROLS by CHOICES
        self.validate_sampler()
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
    eval_data: str | None = "data/demo/prepared/val.jsonl"  # held-out loss; none to skip
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
class GRPOConfig(JudgeConfig, SamplerConfig, TrainConfig):
    data: str = "data/demo/prepared/rl.jsonl"
    eval_data: str | None = None  # a held-out split answered greedily every eval_every steps
    eval_every: int = 0  # 0 = never
    eval_items: int = 0  # a stratified sample of N (training.curve_items; 0 = all)
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
    # judge=rule checks the image statement only against a record's image_facts (the demo's): on records without
    # them a content-free template earns the image step, so GRPO refuses the pair unless this says to go on
    rule_judge_without_image_facts: bool = False
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
        self.validate_sampler()
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
