"""What tools/ablate.py and tools/reproduce.py share to run the project's scripts: a stage's overrides as
the key=value arguments config.py reads, the config its script will read (checked before anything runs),
the "did you mean" of a misspelt name, whether a stage's output is complete, and each stage run to its end.
"""

import difflib
import json
import os
import shlex
import signal
import subprocess

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


def trained(output_dir: str) -> bool:
    """A training script's output is complete. run.save_trained writes the model (config.json) or adapter
    (adapter_config.json) first, then the tokenizer, and the image processor (preprocessor_config.json) last of
    all. transformers writes config.json before the weights, so config.json alone may be a save cut short."""
    done = lambda name: os.path.isfile(os.path.join(output_dir, name))  # noqa: E731
    return (done("adapter_config.json") or done("config.json")) and done("preprocessor_config.json")


def run_to_end(command: list[str]) -> tuple[int, bool]:
    """One stage's script in its own process -> (its exit status, whether a Ctrl-C or SIGTERM stopped it). Ctrl-C
    reaches the script too (one process group) and it saves before it stops: wait for it (subprocess.run would
    kill it mid-save, leaving a half-written output). SIGTERM is passed on to it."""
    print("$ python " + " ".join(shlex.quote(c) for c in command[1:]), flush=True)
    stopped = []
    process = subprocess.Popen(command)

    def pass_on(signum, frame):
        stopped.append(signum)
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        while True:
            try:
                return process.wait(), bool(stopped)
            except KeyboardInterrupt:
                stopped.append(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


def failed(command: list[str], code: int, kept: str) -> str:
    """The message for a stage that ended with exit status `code` (not stopped by the user). "Run the same command
    again" only where that can help: a script killed from outside (the kernel's out-of-memory killer) resumes from
    what it saved; a script that exited has said why above, and a bad input fails again until it is fixed."""
    shown = f"`python {' '.join(command[1:3])} ...`"
    if code < 0:
        return (f"error: {shown} was killed by {signal.Signals(-code).name} (out of memory?); run the same command "
                f"again to go on: {kept} are skipped, and the stage resumes from what it saved")
    return (f"error: {shown} failed (exit {code}): its message above says what went wrong and what to change; "
            f"{kept} are kept, and skipped when the same command runs again")


def missing_files(cfg, made: list[str] = ()) -> list[tuple[str, str]]:
    """The files and folders a script's config reads that are not there -> [(key, path)]: its data, held-out
    data, eval sets (name=path) and the adapter it starts from. `made`: output folders an earlier stage will
    write (the SFT model a GRPO run starts from), not missing."""
    named = [("data", getattr(cfg, "data", None)), ("eval_data", getattr(cfg, "eval_data", None)),
             *(("sets", s.split("=", 1)[-1]) for s in getattr(cfg, "sets", [])),
             ("init_adapter", getattr(cfg, "init_adapter", None)), ("adapter", getattr(cfg, "adapter", None))]
    made = {os.path.normpath(m) for m in made}
    return [(key, path) for key, path in named
            if path and os.path.normpath(path) not in made and not os.path.exists(path)]
