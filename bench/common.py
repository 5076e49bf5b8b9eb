"""What the benchmarks share: demo data, fixed-length sampling, and TRL's view of our data.

TRL is imported inside the functions that need it: `bench/gpu_grpo.py` uses this file without TRL
(it is only in bench/requirements.txt).

Fairness rules every comparison here follows:
  - the same model directory (weights, tokenizer) and the same processor object, ours:
    `model.load_model` (TRL gets the frozen plain model and adds LoRA itself with `peft_config`);
  - LoRA on the same modules (`model.LORA_TARGET`), the same r, alpha, dropout 0;
  - the same records, rendered by the same chat template into the same token ids;
  - the same optimiser settings (AdamW, or paged 8-bit AdamW on a GPU; betas (0.9, 0.999), no weight
    decay, gradient clipping at 1.0, constant lr, no warm-up) and the same seed;
  - no logging, checkpointing or progress printing inside the timed steps beyond what each loop
    always does (TRL: report_to none, no saves, no log rows).
"""

import contextlib
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pathvlm.config import ModelConfig  # noqa: E402
from pathvlm.generation import special_token_ids, stop_token_ids  # noqa: E402
from pathvlm.images import open_image  # noqa: E402
from pathvlm.model import LORA_TARGET, load_model  # noqa: E402
from pathvlm.records import Record, format_prompt_text, image_path, load_split, target_text  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Data and model

def prepare_demo_data(out_dir: str, sft_size: int = 64, rl_size: int = 32) -> str:
    """The real demo preparer (IHC patches, 56 px -> 4 image tokens) into out_dir; returns out_dir."""
    from data.demo.prepare import main as prepare

    prepare(["--out", out_dir, "--sft-size", str(sft_size), "--rl-size", str(rl_size), "--test-size", "8"])
    return out_dir


@contextlib.contextmanager
def full_length():
    """Inside the block no stop token can be sampled, by either sampler (static or hf): every completion
    is exactly max_new_tokens long, so both loops of a comparison do the same work per step (TRL gets
    min_new_tokens = max_new_tokens through `GRPOConfig.generation_kwargs`). For benchmarks only: it
    changes the distribution sampled from, which the log-prob passes do not know."""
    import pathvlm.generation
    import pathvlm.sampler

    def with_stops(special_token_ids):
        return lambda tokenizer: special_token_ids(tokenizer) + stop_token_ids(tokenizer)
    with patched(pathvlm.generation, "special_token_ids", with_stops), \
            patched(pathvlm.sampler, "special_token_ids", with_stops):
        yield


def load_plain_model(model_dir: str, **model_keys):
    """The frozen model and our processor exactly as `model.load_model` builds them, without LoRA:
    TRL adds its own from `lora_config`. model_keys: ModelConfig fields (quantization=...)."""
    return load_model(ModelConfig(model=model_dir, **model_keys), trainable=False, lora=False)


def lora_config(r: int = 8, alpha: int = 16):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGET, task_type="CAUSAL_LM")


def _record_columns(r: Record, split_path: str) -> dict:
    return {"id": r.id, "question": r.question, "options": r.options, "answer": r.answer,
            "image": open_image(image_path(split_path, r))}


def trl_grpo_dataset(split_path: str):
    """Our records as TRL's GRPOTrainer expects them: a conversational `prompt` and an `image` column.
    TRL puts the image before the text (trl.data_utils.prepare_multimodal_messages), which renders
    to exactly the token ids of records.prompt_messages."""
    from datasets import Dataset

    rows = []
    for r in load_split(split_path):
        rows.append({"prompt": [{"role": "user", "content": format_prompt_text(r.question, r.options)}],
                     **_record_columns(r, split_path)})
    return Dataset.from_list(rows)


def trl_sft_dataset(split_path: str):
    """Our SFT records as TRL's prompt-completion format with an `image` column. TRL's completion
    renders as target + <|im_end|> + "\\n": one token more per example than ours (target + EOS)."""
    from datasets import Dataset

    rows = []
    for r in load_split(split_path):
        rows.append({"prompt": [{"role": "user", "content": format_prompt_text(r.question, r.options)}],
                     "completion": [{"role": "assistant", "content": target_text(r)}],
                     **_record_columns(r, split_path)})
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------------
# Our rewards in TRL's signature: fn(prompts, completions, completion_ids, **dataset columns)

def _texts_and_records(completions, options, answer, question):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # conversational -> text
    records = [Record(id="", image="", question=q, options=o, answer=a) for q, o, a in zip(question, options, answer)]
    return texts, records


def trl_reward_functions(completion_lengths: list | None = None):
    """[format, accuracy] as TRL reward functions (weights 1, 1: TRL's default sum), calling
    rewards.format_reward / accuracy_reward(require_format=False) as our loop does. If given,
    `completion_lengths` collects the token length of every completion TRL scored."""
    from rewards import accuracy_reward, format_reward

    def format_trl(prompts, completions, completion_ids, options, answer, question, **kwargs):
        if completion_lengths is not None:
            completion_lengths.extend(len(ids) for ids in completion_ids)
        return format_reward(*_texts_and_records(completions, options, answer, question))

    def accuracy_trl(prompts, completions, completion_ids, options, answer, question, **kwargs):
        return accuracy_reward(*_texts_and_records(completions, options, answer, question), require_format=False)

    return [format_trl, accuracy_trl]


# ----------------------------------------------------------------------------------------------
# Building TRL's GRPOTrainer with our settings

def make_trl_grpo_trainer(model, processor, dataset, output_dir: str, *, num_prompts: int, group_size: int,
                          max_new_tokens: int, max_steps: int, lr: float, beta: float, lora_r: int, lora_alpha: int,
                          loss_type: str = "grpo", seed: int = 0, bf16: bool = False,
                          gradient_checkpointing: bool = False, micro_batch_size: int | None = None,
                          completion_lengths: list | None = None, optim: str = "adamw_torch"):
    """GRPOTrainer doing our step: B prompts x G completions, one optimizer step per generation
    (μ = 1), β with the adapter-disabled reference (a fresh LoRA via peft_config), EOS ignored.

    TRL's defaults we override, each of which would change the comparison: gradient_checkpointing
    (True), bf16 (True), loss_type ("dapo"), learning_rate (1e-6), and per_device_train_batch_size,
    which counts completions, not prompts."""
    import torch
    from trl import GRPOConfig, GRPOTrainer

    completions_per_step = num_prompts * group_size
    micro = micro_batch_size or completions_per_step
    args = GRPOConfig(
        output_dir=output_dir, seed=seed, max_steps=max_steps,
        per_device_train_batch_size=micro, gradient_accumulation_steps=completions_per_step // micro,
        num_generations=group_size, max_completion_length=max_new_tokens, temperature=1.0, top_p=1.0,
        # min_new_tokens: EOS cannot be sampled, as in our loop under full_length; suppress the
        # same special tokens our loop suppresses (TRL alone would suppress only <|image_pad|>)
        generation_kwargs={"min_new_tokens": max_new_tokens, "suppress_tokens": special_token_ids(processor.tokenizer)},
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, optim=optim, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
        beta=beta, loss_type=loss_type, num_iterations=1, epsilon=0.2, scale_rewards="group",
        bf16=bf16, fp16=False, gradient_checkpointing=gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        report_to="none", save_strategy="no", logging_steps=max_steps + 1, disable_tqdm=True,
    )
    return GRPOTrainer(model=model, args=args, processing_class=processor, train_dataset=dataset,
                       reward_funcs=trl_reward_functions(completion_lengths),
                       peft_config=lora_config(lora_r, lora_alpha))


def timed(fn, out: list, sync=lambda: None):
    """fn, appending its wall time to `out` at each call. sync: torch.cuda.synchronize on a GPU, so
    that queued kernels count in the phase that launched them."""
    def wrapper(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        sync()
        out.append(time.perf_counter() - t0)
        return result
    return wrapper


@contextlib.contextmanager
def patched(module, name: str, wrap):
    """Replace module.name by wrap(module.name) inside the block. Our loops call their helpers by
    module-level name at each step, so a benchmark can time or count a phase of the real loop
    without a line of it changing."""
    original = getattr(module, name)
    setattr(module, name, wrap(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def cuda_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PhaseTimer:
    """Wall time of TRL's step phases, by wrapping two trainer methods on the instance (TRL's own
    profiling only reaches wandb/trackio): `_generate_single_turn` is the `generate` call alone,
    `_generate_and_score_completions` adds tokenisation and image processing, the reference
    log-probs and the rewards. With steps_per_generation = gradient_accumulation_steps each runs
    once per optimizer step."""

    def __init__(self, trainer):
        self.generate_s, self.rollout_s = [], []
        trainer._generate_single_turn = timed(trainer._generate_single_turn, self.generate_s, cuda_sync)
        trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, self.rollout_s,
                                                        cuda_sync)


def train_trl_timed(trainer, completion_lengths: list, completions_per_step: int) -> list[dict]:
    """trainer.train() with its phases timed -> one row per optimizer step: step_s, generation_s,
    rollout_s (TRL's _generate_and_score_completions, generation included) and completion_len, the
    mean length of its completions (completion_lengths: filled by trl_reward_functions)."""
    ends, phases = step_end_callback(), PhaseTimer(trainer)
    trainer.add_callback(ends)
    trainer.train()
    n = completions_per_step
    return [{"step_s": step, "generation_s": gen, "rollout_s": rollout,
             "completion_len": sum(completion_lengths[i * n:(i + 1) * n]) / n}
            for i, (step, gen, rollout) in enumerate(zip(ends.step_seconds(), phases.generate_s, phases.rollout_s))]


def step_end_callback():
    """A TrainerCallback that records the wall clock at the start of training and at the end of every
    optimizer step. Step i takes ends[i] - ends[i-1]: the whole step as the user waits for it (data
    loading and collation, TRL's bookkeeping included), as our loops' step_s covers the whole step."""
    from transformers import TrainerCallback

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def step_seconds(self) -> list[float]:
            return [b - a for a, b in zip(self.ends, self.ends[1:])]

    return StepEnds()


# ----------------------------------------------------------------------------------------------
# Reading and printing

def read_metrics(output_dir: str) -> list[dict]:
    from pathvlm.evaluation import read_jsonl

    return read_jsonl(os.path.join(output_dir, "metrics.jsonl"))


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def print_table(rows: list[tuple], header: tuple):
    """rows: (label, value, value, ...) with floats printed to 4 significant digits."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    table = [tuple(map(cell, header))] + [tuple(map(cell, r)) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for n, r in enumerate(table):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
