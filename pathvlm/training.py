"""What both training loops share: their data (over-long examples dropped and named), the order they
see it in, the optimizer and its schedule, saving what was trained, and running as several processes.

train_sft.py and train_grpo.py import these; neither imports the other.
"""

import math
import os
import random
import resource
import sys
import warnings

import torch
from PIL import Image

from pathvlm.errors import BadInput
from pathvlm.records import Record, image_path, load_split, prompt_messages, target_text

# optimizer=paged_adamw_8bit on the CPU: bitsandbytes falls back to the unpaged AdamW8bit (paging moves optimizer
# state between GPU and CPU memory; on a CPU there is nothing to page) and warns at every parameter's first step.
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)


# ----------------------------------------------------------------------------------------------
# Data

def example_length(processor, record: Record, split_path: str, with_target: bool = True) -> int:
    """Prompt tokens (image tokens included) [+ target tokens + EOS], without building pixel tensors."""
    with Image.open(image_path(split_path, record)) as im:
        width, height = im.size
    n_patches = processor.image_processor.get_number_of_image_patches(height, width, {})
    n_image_tokens = n_patches // processor.image_processor.merge_size ** 2
    prompt = processor.apply_chat_template(prompt_messages(record), tokenize=False, add_generation_prompt=True)
    n_prompt = len(processor.tokenizer(prompt)["input_ids"]) - 1 + n_image_tokens  # one <|image_pad|> expands
    if not with_target:
        return n_prompt
    return n_prompt + len(processor.tokenizer(target_text(record))["input_ids"]) + 1


# No tokenizer token spans more characters than this: a text longer than max_len times it is over max_len tokens
# without being tokenised (a 50 MB question would take the tokenizer minutes)
MAX_CHARS_PER_TOKEN = 64


def split_by_length(records: list[Record], processor, max_len: int, split_path: str = "", with_target: bool = True
                    ) -> tuple[list[Record], list[Record]]:
    """-> (records of at most max_len tokens, the others), each in order."""
    kept, dropped = [], []
    for r in records:
        text = len(r.question) + sum(map(len, r.options)) + (len(r.answer) + len(r.explanation)) * with_target
        over = text > MAX_CHARS_PER_TOKEN * max_len or example_length(processor, r, split_path, with_target) > max_len
        (dropped if over else kept).append(r)
    return kept, dropped


def load_examples(path: str, processor, max_len: int, with_target: bool = True, max_len_key: str = "max_len"
                  ) -> list[Record]:
    """The split's records (inputs.check_split has checked them and their images) without those longer
    than max_len tokens: dropped, counted and named on stdout, never cut."""
    records = load_split(path)
    kept, dropped = split_by_length(records, processor, max_len, path, with_target)
    if dropped:
        print(f"{path}: dropped {len(dropped)} examples longer than {max_len_key}={max_len} tokens (image tokens "
              f"included; truncating would cut them): {', '.join(r.id for r in dropped[:10])}"
              + (" ..." if len(dropped) > 10 else ""))
    if not kept:
        raise BadInput(f"{path}: no examples left (all {len(records)} longer than {max_len_key}={max_len})")
    return kept


CURVE_SEED = 0  # fixed, not the run's seed: every run, seed and resume of a split draws the same curve items


def curve_stratum(record: Record) -> str:
    """What the curve's sample keeps in proportion: a closed question's answer letter, else the kind. A
    model that favours one letter reads high or low on a subset where that letter is over- or under-
    represented (the first N items of a split are whatever order it was written in); open questions have no
    letter, and their difficulty differs from a multiple choice's, so they are one stratum of their own."""
    return f"closed {record.answer}" if record.options else "open"


def curve_sample(records: list[Record], n: int, seed: int = CURVE_SEED) -> list[Record]:
    """n of the records (all when n <= 0 or n >= their number), drawn as a stratified sample: each stratum
    (curve_stratum) gets its share of n by largest remainder, its items drawn by `seed`; returned in the
    split's order. Fixed by the seed and the split alone, so a resumed run scores the same items."""
    if n <= 0 or n >= len(records):
        return list(records)
    strata: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        strata.setdefault(curve_stratum(record), []).append(index)
    exact = {key: n * len(members) / len(records) for key, members in strata.items()}
    share = {key: int(value) for key, value in exact.items()}
    # the seats left go to the largest remainders; ties by stratum name, so the draw does not hang on dict order
    for key in sorted(exact, key=lambda k: (share[k] - exact[k], k))[:n - sum(share.values())]:
        share[key] += 1
    rng = random.Random(seed)
    chosen = [i for key in sorted(strata) for i in rng.sample(strata[key], share[key])]
    return [records[i] for i in sorted(chosen)]


def curve_items(path: str, records: list[Record], n: int, procs_main: bool = True) -> list[Record]:
    """The held-out items the training-time curve scores (eval_items of them, 0 or fewer: all): a fixed,
    seeded sample stratified by answer letter (curve_sample), the same on every run and resume of
    the split, never its first N. A split named test*.jsonl gets a note: a curve on the test set, read to
    choose a checkpoint, tunes the model to the test set the paper's table reports."""
    if procs_main and os.path.basename(path).startswith("test"):
        print(f"note: eval_data is a test split ({path}): the curve is then measured on the test set; do not "
              "choose a checkpoint by it. Point eval_data at a validation split (the preparers' val.jsonl)")
    return curve_sample(records, n)


class DataOrder:
    """Shuffled epochs from (seed, epoch): the position (epoch, cursor) is all that resume needs."""

    def __init__(self, n: int, seed: int, epoch: int = 0, cursor: int = 0):
        self.n, self.seed, self.epoch, self.cursor = n, seed, epoch, cursor
        self.perm = self._perm()

    def _perm(self):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch)).tolist()

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self.perm = self._perm()
            out.append(self.perm[self.cursor])
            self.cursor += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


def make_optimizer(cfg, params):
    params = [p for p in params if p.requires_grad]
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2))
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb  # 8-bit optimizer states: ~75% less optimizer memory, for GPUs

    if cfg.optimizer == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, **kwargs)
    if cfg.optimizer == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, **kwargs)
    sys.exit(f"config error: optimizer must be adamw, adamw_8bit or paged_adamw_8bit, got '{cfg.optimizer}'")


def make_scheduler(cfg, optimizer):
    def factor(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# Several processes: data parallel on torch.distributed

class Processes:
    """This run's processes. `python train_grpo.py ...` is one; `torchrun --nproc_per_node N` or
    `accelerate launch --num_processes N` start N, each with RANK / WORLD_SIZE / LOCAL_RANK set, and
    this joins them in one torch.distributed group (NCCL on GPUs, gloo on CPUs). Every method is then
    a collective: all processes call it at the same point of the loop. With one process each is the
    identity, so a one-process run does exactly what it did before this class existed.

    What the loops do with it, and nothing else: each process takes its slice of the step's data,
    sums what the step's loss is divided by (sequences, tokens) over all processes, sums the LoRA
    gradients before clipping, and gathers what is logged to the main process, which alone writes."""

    def __init__(self, timeout_s: float = 600):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.main = self.rank == 0
        self.device = torch.device("cpu")
        if self.world_size == 1:
            return
        import datetime

        import torch.distributed as dist

        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            # timeout: a process that hangs (rather than dies, which torchrun notices at once) stops the
            # others after this long, with torch.distributed's error naming the collective
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        self.dist = dist

    def my_part(self, items: list) -> list:
        """This process's contiguous slice of a list dealt to all of them (its length a multiple of N)."""
        size = len(items) // self.world_size
        return items[self.rank * size:(self.rank + 1) * size]

    def sum(self, value) -> float:
        """A number summed over the processes."""
        if self.world_size == 1:
            return float(value)
        total = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(total)
        return float(total)

    def all(self, flag: bool) -> bool:
        """True only if it is True in every process (e.g. "this step's loss is finite")."""
        return self.sum(not flag) == 0

    def any(self, flag: bool) -> bool:
        return self.sum(flag) > 0

    def cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Equal-sized tensors of every process, concatenated in rank order along dim 0."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor, device=self.device) for _ in range(self.world_size)]
        self.dist.all_gather(parts, tensor.to(self.device))
        return torch.cat(parts).to(tensor.device)

    def gather(self, obj) -> list:
        """Any picklable object of every process, in rank order (a list in every process)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def merge(self, part: dict) -> dict:
        """Every process's part of a step's record, merged in rank order: lists concatenated, numbers
        summed, dicts merged key by key. With one process: `part` itself."""
        parts = self.gather(part)
        return part if len(parts) == 1 else self._merge(parts)

    def _merge(self, values: list):
        if isinstance(values[0], dict):
            return {k: self._merge([v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], list):
            return [x for v in values for x in v]
        return sum(values)

    def same_start(self, params: list[torch.Tensor]):
        """Every process takes the main process's values of these (a new LoRA's random init), as DDP
        does when it wraps a model: each process seeds its own random stream, so their inits differ."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for p in params:
                data = p.data.to(self.device)
                self.dist.broadcast(data, src=0)
                p.data.copy_(data)

    def sum_gradients(self, params: list[torch.Tensor]):
        """Each gradient summed over the processes, in one flat all-reduce. The loops divide every
        process's loss by the whole step's counts, so the sum is the gradient of the whole step."""
        if self.world_size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        self.dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def barrier(self):
        if self.world_size > 1:
            self.dist.barrier()


# ----------------------------------------------------------------------------------------------
# What the loops log

def mean_of_scored(values: list) -> float | None:
    """The mean over the completions that have a value (a process-reward component is None where unscored)."""
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else None


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process RSS)
