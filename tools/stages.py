"""What tools/ablate.py and tools/reproduce.py share to run the project's scripts: a stage's overrides as
the key=value arguments config.py reads, the config its script will read (checked before anything runs),
and the "did you mean" of a misspelt name."""

import difflib
import json

from pathvlm.config import load_config
from rewards import REWARDS


def as_args(overrides: dict) -> list[str]:
    """{key: value} -> the key=value arguments config.py reads: None as null, mappings and lists as JSON."""
    return [f"{k}={'null' if v is None else json.dumps(v) if isinstance(v, (dict, list)) else v}"
            for k, v in overrides.items()]


def script_config(cls, path: str, overrides: dict):
    """The config a script will read from `path` and `overrides`: config.load_config as the script calls it,
    with the reward names train_grpo.py passes."""
    return load_config(cls, path, as_args(overrides), names={"rewards": REWARDS})


def did_you_mean(word, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
