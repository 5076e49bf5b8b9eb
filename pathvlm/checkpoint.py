"""Checkpoints that resume exactly: trainable weights, optimizer, scheduler, RNG states, data position.

A checkpoint is written to `<output_dir>/checkpoints/.tmp-step_N` and renamed to `step_N` only when
complete, so a run killed mid-save never leaves a half-written checkpoint that `resume=auto` picks up.
Ctrl-C or SIGTERM (`StopAfterStep`) lets the step in progress finish before the loop saves, so that
checkpoint too is a step boundary and the resumed run equals the uninterrupted one.
"""

import contextlib
import json
import os
import random
import shutil
import signal
import sys
import threading
import time

import numpy as np
import torch

from pathvlm.errors import BadInput, reading

CKPT_DIR = "checkpoints"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, CKPT_DIR, f"step_{step:07d}")


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, extra: dict, keep: int = 2,
                    save_model=None, rng_states: list[dict] | None = None) -> str:
    """extra: JSON-able loop state (data position, counters). save_model(dir) optionally writes a
    loadable adapter/model beside the state, so a checkpoint can also be evaluated directly.
    rng_states: every process's RNG state, in rank order (default: this process's alone)."""
    root = os.path.join(output_dir, CKPT_DIR)
    final = step_dir(output_dir, step)
    tmp = os.path.join(root, f".tmp-step_{step:07d}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with saving(f"the checkpoint of step {step}", tmp, output_dir):
            os.makedirs(tmp)
            torch.save({"model": trainable_state(model), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "rng": rng_states or [rng_state()]}, os.path.join(tmp, "state.pt"))
            with open(os.path.join(tmp, "loop.json"), "w") as f:
                json.dump({"step": step, **extra}, f)
            if save_model is not None:
                save_model(os.path.join(tmp, "model"))
    except SaveFailed:
        shutil.rmtree(tmp, ignore_errors=True)  # the partial copy goes, so the disk keeps what space it had
        raise
    previous = os.path.join(root, f".old-step_{step:07d}")
    if os.path.isdir(final):
        # this step saved before (a finished run run again saves its last step again): moved aside whole,
        # not deleted in place, or a kill -9 midway leaves a half-deleted step_N that resume=auto picks
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(tmp, final)
    shutil.rmtree(previous, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


class SaveFailed(BadInput):
    """A checkpoint or the final model could not be written (disk full, read-only, quota): the run stops with
    this message, the newest complete checkpoint untouched, rather than training on with nothing saved."""


@contextlib.contextmanager
def saving(what: str, path: str, output_dir: str):
    """Turn a failed write into one message: what failed, where, why, and what there is to resume from."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        import resource

        if isinstance(e, OSError):
            why = str(e.strerror or e)
        else:  # torch.save's zip writer says only "unexpected pos ..." when a write comes up short
            why = ("the file stopped part-way: the disk is full, a quota or file-size limit was reached, or the "
                   f"directory is no longer writable (torch: {str(e).splitlines()[0][:120]})")
        free = shutil.disk_usage(output_dir if os.path.isdir(output_dir) else ".").free
        if free < 100 * 2**20:
            why += f"; {free / 2**20:.0f} MiB free on that disk"
        file_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if file_limit != resource.RLIM_INFINITY:
            why += f"; this process may not write files over {file_limit / 1024:.0f} KiB (ulimit -f)"
        newest = list_checkpoints(output_dir)
        keep = (f"the newest complete checkpoint, {newest[-1]}, is untouched: free space (or make the directory "
                "writable) and run the same command to resume from it") if newest else "no checkpoint was saved yet"
        raise SaveFailed(f"could not write {what} to {path} ({why}); {keep}") from None


_CLAIMED = {}  # output_dir -> its open lock file, held until this process ends


def claim_output_dir(output_dir: str):
    """One run per output_dir: an exclusive lock on output_dir/.lock, held as long as this process lives
    (the kernel drops it when the process ends, kill -9 included, so a stale lock never blocks a resume).
    Two runs writing one directory would interleave their logs and overwrite each other's weights.
    A process that claimed it already (a script's main() called again, as the tests do) keeps it."""
    import fcntl

    key = os.path.realpath(output_dir)
    if key in _CLAIMED:
        return
    os.makedirs(output_dir, exist_ok=True)
    handle = open(os.path.join(output_dir, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise BadInput(f"output_dir {output_dir} is in use by {holder}: wait for that run to end, or give this "
                       "one another output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    _CLAIMED[key] = handle


def release_output_dir(output_dir: str):
    """At a run's normal end (a run that fails keeps its claim until its process ends)."""
    handle = _CLAIMED.pop(os.path.realpath(output_dir), None)
    if handle is not None:
        handle.close()


# What a resumed run may set differently from the run it continues: how long it goes on, how it logs and
# saves, and how it reaches its judge. Anything else (lr, data, seed, LoRA rank, rewards ...) would make
# the resumed run another experiment under the first one's name.
RESUME_MAY_CHANGE = {"max_steps", "save_every", "keep_checkpoints", "resume", "eval_every", "eval_items", "sample_every",
                     "log_groups", "tensorboard", "max_bad_steps", "collective_timeout", "output_dir",
                     "judge_concurrency", "judge_timeout", "judge_deadline", "judge_max_retries", "judge_cache_dir",
                     "judge_max_failure_share", "judge_failure_window"}


def check_resume_config(checkpoint: str, cfg):
    """Refuse to resume `checkpoint` with a config that differs from the one it was written with, naming
    every differing key (older checkpoints without a config pass)."""
    import dataclasses

    with open(os.path.join(checkpoint, "loop.json")) as f:
        saved = json.load(f).get("config")
    if saved is None:
        return
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as the saved copy has them
    changed = [k for k in now if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]
    if changed:
        listed = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise BadInput(f"resume: {checkpoint} was written with other settings ({listed}). Resume with the "
                       f"checkpoint's values, start a new output_dir, or resume=none to start afresh here. Keys that "
                       f"may change on resume: {', '.join(sorted(RESUME_MAY_CHANGE))}")


def list_checkpoints(output_dir: str) -> list[str]:
    root = os.path.join(output_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_"))
    return [os.path.join(root, n) for n in names]


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint at `path` cannot be resumed, or None when it is complete: loop.json a JSON object with
    its step, state.pt a zip archive (torch.save's format) whose every member passes its checksum, and each
    safetensors file of its model/ (where it has one) covering its header. A step_N folder is renamed into place
    only once written, so what this finds came later: a file deleted, a copy cut short, a disk error. It reads
    state.pt once (seconds for a 7B adapter's optimizer state): the cost of not resuming from a damaged one."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    try:
        with open(os.path.join(path, "loop.json")) as f:
            loop = json.load(f)
        if not isinstance(loop, dict) or not isinstance(loop.get("step"), int):
            return "loop.json has no step number"
        with zipfile.ZipFile(os.path.join(path, "state.pt")) as archive:
            damaged = archive.testzip()
        if damaged:
            return f"state.pt is damaged: {damaged} fails its checksum"
        model = os.path.join(path, "model")
        for name in sorted(os.listdir(model)) if os.path.isdir(model) else []:
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(model, name), "pt"):
                    pass
    except FileNotFoundError as e:
        return f"{os.path.basename(e.filename)} is missing"
    except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None


def find_resume(output_dir: str, resume: str, say=print) -> str | None:
    """resume: 'auto' (the newest complete checkpoint in output_dir, if any), 'none', or a checkpoint directory.
    With auto, an incomplete newer one is passed over, said with say() (the main process prints it): a crash
    there forever would lose the run. An incomplete one named in resume=, or none complete, stops the run."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            say(f"resume: passing over {path}, which is incomplete ({problem})")
        if found:
            raise BadInput(f"resume: none of the {len(found)} checkpoint(s) in {os.path.dirname(found[0])} is "
                           "complete (above: why): move that folder away to start this run afresh, or give another "
                           "output_dir")
        return None
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"resume: no checkpoint at {resume} (expected {resume}/state.pt)")
    problem = checkpoint_problem(resume)
    if problem:
        raise BadInput(f"resume: the checkpoint {resume} is incomplete ({problem}): name an older one, or "
                       "resume=auto to take the newest complete checkpoint of output_dir")
    return resume


def load_checkpoint(path: str, model, optimizer, scheduler, rank: int = 0, world_size: int = 1) -> dict:
    """Weights, optimizer, scheduler and this process's RNG state (rank of world_size) -> the loop state."""
    # onto the CPU first: saved from cuda:0, every rank's optimizer state would otherwise land on GPU 0.
    # copy_ below moves the weights to each parameter's device, and Optimizer.load_state_dict the state.
    with reading(os.path.join(path, "state.pt"), "the checkpoint state", "resume from an older checkpoint (resume=)"):
        state = torch.load(os.path.join(path, "state.pt"), weights_only=False, map_location="cpu")
    rng_states = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older: one dict
    if len(rng_states) != world_size:
        # weights, optimizer and data position would carry over; each process's sampling stream would not,
        # so the run would no longer be the one that was checkpointed
        raise BadInput(f"checkpoint {path} was written by {len(rng_states)} process(es), this run has "
                       f"{world_size}: resume with {len(rng_states)} (or start a new output_dir with "
                       "init_adapter=<its model/>)")
    params = dict(model.named_parameters())
    missing = [n for n in state["model"] if n not in params]
    if missing:
        raise ValueError(f"checkpoint {path} does not match this model: {len(missing)} unknown weights, e.g. {missing[0]}")
    with torch.no_grad():
        for n, value in state["model"].items():
            params[n].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(rng_states[rank])
    with open(os.path.join(path, "loop.json")) as f:
        return json.load(f)


def truncate_metrics(path: str, step: int):
    """Drop lines logged after `step` (metrics.jsonl, samples.jsonl): they came from the part of the run
    being redone."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    kept = []
    for ln in lines:
        try:
            if json.loads(ln).get("step", 0) <= step:
                kept.append(ln)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class MetricsLog:
    """One JSON object per line in output_dir/metrics.jsonl, flushed as written."""

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "a")

    def write(self, row: dict):
        self.file.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class StopAfterStep:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) during training: the step in progress
    finishes, then the loop sees `requested`, saves a checkpoint and exits. Stopping mid-step instead
    would save a state that never existed between steps (the batch already drawn, the RNG moved on,
    perhaps the weights updated), and the resumed run would differ from the uninterrupted one.
    A second signal stops at once: the run exits with stopped_at_once_message, and the step in progress is
    lost. run.Run.steps uses it so:

        stop = StopAfterStep(output_dir)    # installs the handlers
        try:
            while step < max_steps:
                ...one step...
                stop.exit_if_requested(step, max_steps, save)
        finally:
            stop.restore()                  # the handlers that were there before
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.requested: str | None = None  # the name of the signal that asked, once one has
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals only there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.requested:  # SystemExit, not KeyboardInterrupt: the loop body it lands in has no handler of its own
            raise SystemExit(stopped_at_once_message(self.output_dir))
        self.requested = signal.Signals(signum).name
        under_torchrun = ("" if "TORCHELASTIC_RUN_ID" not in os.environ else
                          "; torchrun kills its processes after its --shutdown-timeout (30 s unless given): a run "
                          "launched with `torchrun --shutdown-timeout S`, S longer than a step and a save, finishes "
                          "both, else it stops mid-step and the newest checkpoint stays the one to resume")
        print(f"\n{self.requested}: finishing this step, then saving a checkpoint (send it again to stop at once)"
              f"{under_torchrun}", file=sys.stderr, flush=True)

    def exit_if_requested(self, step: int, max_steps: int, save, anywhere=bool):
        """At a step's end: if a signal asked, save(step) and exit. After the last step the loop's own
        final save follows anyway. anywhere(flag): whether any of the run's processes has it (the
        loops pass training.Processes.any), so that all of them stop after the same step."""
        # decided by the collective's answer alone: a signal that lands just after it (the handler runs as the
        # call returns) must not send this process to save while the others go on to the next step
        stop = anywhere(self.requested is not None)
        if stop and self.requested is None:
            self.requested = "a signal to another process"
        if stop and step < max_steps:
            path = save(step)
            sys.exit(f"\nstopped by {self.requested} after step {step}: saved {path}; "
                     "run the same command again to resume")

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_deferred(what: str):
    """Ctrl-C and SIGTERM wait until the enclosed save is done (said when they come), then stop the run with a
    line saying what was saved. A stop midway would leave a model's config without its weights."""
    caught = []

    def note(signum, frame):
        caught.append(signal.Signals(signum).name)
        print(f"\n{caught[-1]}: writing {what} first", file=sys.stderr, flush=True)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, note) for s in StopAfterStep.SIGNALS} if main_thread else {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        sys.exit(f"stopped by {caught[0]} once {what} was written: the run is complete, nothing after it ran")


def stopped_at_once_message(output_dir: str) -> str:
    newest = list_checkpoints(output_dir)
    where = f"the newest checkpoint is {newest[-1]}" if newest else "no checkpoint was saved yet"
    return (f"\nstopped at once: the step in progress is lost; {where}; "
            "run the same command again to resume from it")
