"""Configs: YAML file -> typed dataclass -> `key=value` overrides from the command line.

    python train_grpo.py configs/grpo.yaml lr=1e-6 group_size=8

Every key is read once, here; scripts get a `cfg` an editor can follow. An unknown key or a value
of the wrong type stops the run with a message naming the key and the file it came from.
"""

import dataclasses
import difflib
import json
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
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    quantization: str = "none"  # none | 4bit (NF4, double quant) | 8bit
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112  # the paper's 7B runs use larger images: see configs/*.yaml
    gradient_checkpointing: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    backend: str = "hf"  # hf | unsloth (GPU only, optional)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str, source: str):
    """Check (and, for strings from the command line, parse) one value against its field type."""
    origin = typing.get_origin(tp)
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


def to_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=1)


__all__ = ["ConfigError", "ModelConfig", "load_config", "parse_args", "save_config", "dataclass", "field"]
