"""A training run's life around its loop, the part train_sft.py and train_grpo.py share, so that each
script's main shows its own step and little else:

    run = Run(cfg, logs=("metrics.jsonl",))            # processes joined, seeded, output_dir claimed
    model, optimizer, scheduler = ...
    step, loop = run.resume(model, optimizer, scheduler)   # the checkpoint's loop state, or None
    for step in run.steps(step, loop_state):          # Ctrl-C / SIGTERM and save_every between steps
        ...one step...
        run.log(row, loss=...)                         # metrics.jsonl, tensorboard, the progress bar
    run.finish(step, loop_state, write_model)          # last checkpoint, the trained model, released

loop_state() -> the loop's own JSON-able state (data order, counters): every checkpoint saves it beside
the weights, optimizer, scheduler and every process's RNG state, and a resumed run continues exactly.
"""

import dataclasses
import os
import shutil
import sys

from tqdm import tqdm

from pathvlm import checkpoint as ckpt
from pathvlm.config import save_config
from pathvlm.training import Processes


class Run:
    def __init__(self, cfg, name: str, logs: tuple[str, ...] = ("metrics.jsonl",)):
        """name: the progress bar's label; logs: the JSONL files of output_dir the loop appends to, one row a
        step (the first is metrics.jsonl, which log() writes)."""
        self.cfg, self.name = cfg, name
        # one process, or N under torchrun / accelerate launch, each with its slice of every step's data
        self.procs = Processes(cfg.collective_timeout)
        # each process its own sampling stream (else N processes would draw the same random numbers)
        ckpt.seed_everything(cfg.seed + 1000 * self.procs.rank)
        self.resume_from = start_output_dir(cfg, self.procs)  # claimed for this run; the checkpoint to resume
        self.log_paths = [os.path.join(cfg.output_dir, n) for n in logs]
        self.files, self.tb, self.bar = {}, None, None
        self.model = self.optimizer = self.scheduler = self.save_model = None

    @property
    def main(self) -> bool:
        return self.procs.main

    def resume(self, model, optimizer, scheduler, save_model=None) -> tuple[int, dict | None]:
        """What a checkpoint holds, registered; the checkpoint being resumed loaded into it; the logs cut back
        to its step (rows of a run not checkpointed go) and opened. save_model(dir): also write a loadable
        model into each checkpoint. -> (step, the loop state it saved), or (0, None) for a new run."""
        self.model, self.optimizer, self.scheduler, self.save_model = model, optimizer, scheduler, save_model
        step, loop = 0, None
        if self.resume_from:
            loop = ckpt.load_checkpoint(self.resume_from, model, optimizer, scheduler, self.procs.rank,
                                        self.procs.world_size)
            step = loop["step"]
            if self.main:
                print(f"resumed from {self.resume_from} at step {step}")
        if self.main:
            for path in self.log_paths:
                ckpt.truncate_metrics(path, step)
        self.procs.barrier()  # the files are truncated before anyone appends
        if self.main:  # the main process writes the logs; the others send it their part of each step
            self.files = {path: (ckpt.MetricsLog(path) if i == 0 else open(path, "a"))
                          for i, path in enumerate(self.log_paths)}
            self.tb = open_tensorboard(self.cfg)
        return step, loop

    def save(self, step: int, loop_state: dict) -> str:
        """A checkpoint of this step (every process calls it) -> its directory."""
        extra = {**loop_state, "config": dataclasses.asdict(self.cfg)}
        return save_checkpoint(self.procs, self.cfg.output_dir, step, self.model, self.optimizer, self.scheduler,
                               extra, keep=self.cfg.keep_checkpoints, save_model=self.save_model)

    def steps(self, step: int, loop_state):
        """Yields step + 1, ..., max_steps. After each step: the progress bar moves; if Ctrl-C or SIGTERM came
        during it, a checkpoint is saved and the run exits (the step finished, so resume is exact); every
        save_every steps a checkpoint. A second signal stops at once, losing the step in progress."""
        cfg = self.cfg
        self.bar = tqdm(total=cfg.max_steps, initial=step, desc=self.name, dynamic_ncols=True, disable=not self.main)
        stop = ckpt.StopAfterStep(cfg.output_dir)
        try:
            while step < cfg.max_steps:
                step += 1
                yield step
                self.bar.update(1)
                stop.exit_if_requested(step, cfg.max_steps, lambda at: self.save(at, loop_state()), self.procs.any)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                    self.save(step, loop_state())
        finally:
            stop.restore()
            self.bar.close()

    def log(self, row: dict, **shown):
        """A step's row into metrics.jsonl (and tensorboard) by the main process; `shown` on the progress bar."""
        if self.main:
            self.files[self.log_paths[0]].write(row)
            if self.tb:
                for k, v in row.items():
                    if v is not None:
                        self.tb.add_scalar(k, v, row["step"])
        self.bar.set_postfix(shown)

    def file(self, name: str):
        """An extra log of the main process, open for appending (e.g. samples.jsonl)."""
        return self.files[os.path.join(self.cfg.output_dir, name)]

    def finish(self, step: int, loop_state, what: str, write_model):
        """After the last step: its checkpoint; then the main process closes the logs, writes the trained model
        (write_model(dir), `what` names it in a failure) and releases output_dir. The run lets go of the
        model and optimizer, so that what follows (SFT's merged export) can free their memory. Ctrl-C and
        SIGTERM wait for all of it (checkpoint.signals_deferred), and the model is written to a folder of its
        own and moved in file by file, its config last: a config.json or adapter_config.json in output_dir
        means the weights beside it are whole (what tools/ablate.py and the loaders take it to mean)."""
        with ckpt.signals_deferred(f"{what} in {self.cfg.output_dir}"):
            self.save(step, loop_state())
            self.model = self.optimizer = self.scheduler = self.save_model = None
            if self.main:
                for f in self.files.values():
                    f.close()
                with ckpt.saving(what, self.cfg.output_dir, self.cfg.output_dir):
                    move_in(write_model, self.cfg.output_dir)
                ckpt.release_output_dir(self.cfg.output_dir)


def move_in(write, out_dir: str):
    """write(folder) into a fresh folder inside out_dir, then each file moved into out_dir (os.replace:
    atomic), the configs last."""
    tmp = os.path.join(out_dir, ".final-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    for name in sorted(os.listdir(tmp), key=lambda n: n in ("config.json", "adapter_config.json")):
        target = os.path.join(out_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)


def start_output_dir(cfg, procs) -> str | None:
    """Before a loop writes anything: output_dir claimed for this run (one run per output_dir), the checkpoint
    to resume found and refused if it was written with other settings, then the config saved beside it.
    -> that checkpoint, or None."""
    if procs.main:
        ckpt.claim_output_dir(cfg.output_dir)
    resume_from = ckpt.find_resume(cfg.output_dir, cfg.resume,
                                   say=print if procs.main else lambda line: None)
    if resume_from:  # the same experiment, or a clear refusal naming what differs
        ckpt.check_resume_config(resume_from, cfg)
    if procs.main:
        save_config(cfg, cfg.output_dir)
    return resume_from


def save_checkpoint(procs, output_dir: str, step: int, model, optimizer, scheduler, extra: dict, keep: int,
                    save_model=None) -> str:
    """checkpoint.save_checkpoint for a run of one or several processes: every process's RNG state (so
    that each resumes its own stream), written by the main process; the others wait for it."""
    rng_states = procs.gather(ckpt.rng_state())
    if procs.main:
        ckpt.save_checkpoint(output_dir, step, model, optimizer, scheduler, extra, keep=keep, save_model=save_model,
                             rng_states=rng_states)
    procs.barrier()
    return ckpt.step_dir(output_dir, step)


def save_trained(model, processor, out_dir: str, **save_kwargs):
    """A PEFT adapter directory (PeftModel.from_pretrained(base, out_dir) loads it), or the whole
    model for finetune=full; the tokenizer and image processor beside it either way."""
    model.save_pretrained(out_dir, **save_kwargs)
    processor.tokenizer.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)


def open_tensorboard(cfg):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: metrics.jsonl holds everything anyway
        sys.exit("tensorboard=true needs `pip install tensorboard`; or plot metrics.jsonl with tools/report.py curves")
    return SummaryWriter(os.path.join(cfg.output_dir, "tb"))
