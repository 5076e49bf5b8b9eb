"""Stage 1 of PathVLM-R1: supervised fine-tuning on `<think>explanation</think><answer>X) text</answer>`.

    python train_sft.py configs/sft.yaml                  # Qwen2.5-VL-7B, QLoRA, PathMMU SFT split
    python train_sft.py configs/demo_sft.yaml             # the embedded tiny model on the demo data (CPU)
    python train_sft.py configs/demo_sft.yaml lr=1e-3 max_steps=50

Reads top to bottom: config -> data (over-long examples dropped and named) -> model -> loop
(micro-batches, gradient accumulation, clipping, cosine schedule, held-out loss, checkpoints) -> save.
The loss is on the assistant's tokens only: prompt, image and padding tokens never enter it.
"""

import dataclasses
import gc
import os
import sys
import time

import torch
from tqdm import tqdm

import checkpoint as ckpt
from config import SFTConfig, parse_args
from inputs import InputError, check_inputs
from images import open_image
from mcq import Record, image_path, prompt_messages, target_text
from model import compute_dtype, count_params, encode_completions, encode_prompts, image_features, load_model, unwrap
from rollout import completion_logprobs
from training import (DataOrder, Processes, load_examples, make_optimizer, make_scheduler, open_tensorboard,
                      save_checkpoint, save_trained, start_output_dir)


# ----------------------------------------------------------------------------------------------
# Data

def batch_tensors(records: list[Record], split_path: str, processor, device):
    """-> prompt inputs (left-padded), completion ids and mask (right-padded). The loss mask is the
    completion mask: exactly the assistant's tokens, EOS included."""
    images = [open_image(image_path(split_path, r)) for r in records]
    prompt = encode_prompts(processor, [prompt_messages(r) for r in records], images, device)
    completion_ids, completion_mask = encode_completions(processor.tokenizer, [target_text(r) for r in records], device)
    return prompt, completion_ids, completion_mask


# ----------------------------------------------------------------------------------------------

def sft_loss(model, prompt, completion_ids, completion_mask, train_vision: bool = False, num_tokens=None):
    """Negative log-likelihood summed over the assistant's tokens, divided by num_tokens: those of the
    micro-batch (its token mean) or, with several processes, of all processes' micro-batches. A frozen vision
    tower runs without grad: with gradient checkpointing, the hook that makes the inputs require
    grad (for the adapters) would otherwise carry the backward pass through every vision block."""
    features = None if train_vision else image_features(model, prompt)
    logp = completion_logprobs(model, prompt, completion_ids, completion_mask, features)  # (B, T)
    return -(logp * completion_mask).sum() / (completion_mask.sum() if num_tokens is None else num_tokens)


@torch.no_grad()
def heldout_loss(model, records, split_path, processor, device, batch_size, procs) -> float:
    """Token mean of the NLL on the held-out records, each process taking every N-th record."""
    model.eval()
    total, tokens = 0.0, 0
    mine = records[procs.rank::procs.world_size]
    for i in range(0, len(mine), batch_size):
        prompt, ids, mask = batch_tensors(mine[i:i + batch_size], split_path, processor, device)
        total += -(completion_logprobs(model, prompt, ids, mask) * mask).sum().item()
        tokens += mask.sum().item()
    model.train()
    return procs.sum(total) / procs.sum(tokens)


def main(argv=None):
    cfg = parse_args(SFTConfig, argv)
    check_inputs(cfg)  # splits, images, init_adapter, output_dir: named now, not after the model has loaded
    procs = Processes(cfg.collective_timeout)  # one, or N under torchrun / accelerate launch: each takes batch_size examples a micro-step
    ckpt.seed_everything(cfg.seed + 1000 * procs.rank)
    resume_from = start_output_dir(cfg, procs)  # claimed for this run; the checkpoint to resume, if any

    model, processor = load_model(cfg, adapter=cfg.init_adapter, lora=cfg.finetune == "lora",
                                  train_vision=cfg.train_vision)
    procs.same_start([p for p in model.parameters() if p.requires_grad])
    device = next(model.parameters()).device
    train = load_examples(cfg.data, processor, cfg.max_len)
    heldout = load_examples(cfg.eval_data, processor, cfg.max_len)[:cfg.eval_items] if cfg.eval_data else []
    n_trainable, n_total = count_params(model)
    if procs.main:
        print(f"model {cfg.model} ({cfg.finetune}): {n_trainable:,} trainable of {n_total:,} parameters; "
              f"{len(train)} training examples on {device}; effective batch "
              f"{cfg.batch_size * cfg.grad_accum * procs.world_size} = batch_size {cfg.batch_size} x grad_accum "
              f"{cfg.grad_accum} x {procs.world_size} process(es)")

    optimizer = make_optimizer(cfg, model.parameters())
    scheduler = make_scheduler(cfg, optimizer)
    order, step = DataOrder(len(train), cfg.seed), 0
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if resume_from:
        loop = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, procs.rank, procs.world_size)
        step, order = loop["step"], DataOrder(len(train), cfg.seed, **loop["data"])
        if procs.main:
            print(f"resumed from {resume_from} at step {step}")
    if procs.main:  # the log holds the run being resumed or started: rows of a run not checkpointed go
        ckpt.truncate_metrics(metrics_path, step)
    procs.barrier()  # metrics.jsonl is truncated before anyone appends
    log, tb = (ckpt.MetricsLog(metrics_path), open_tensorboard(cfg)) if procs.main else (None, None)

    def save(at_step):
        return save_checkpoint(procs, cfg.output_dir, at_step, model, optimizer, scheduler,
                               {"data": order.state(), "config": dataclasses.asdict(cfg)}, keep=cfg.keep_checkpoints)

    model.train()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="sft", dynamic_ncols=True, disable=not procs.main)
    stop = ckpt.StopAfterStep()  # Ctrl-C / SIGTERM: finish the step, save, exit (resume is then exact)
    try:
        while step < cfg.max_steps:
            t0, loss_sum, n_tokens = time.perf_counter(), 0.0, 0
            for _ in range(cfg.grad_accum):
                batch = [train[i] for i in procs.my_part(order.next(cfg.batch_size * procs.world_size))]
                prompt, ids, mask = batch_tensors(batch, cfg.data, processor, device)
                # the token mean over every process's micro-batch, so N processes equal one with N x batch_size
                loss = sft_loss(model, prompt, ids, mask, cfg.train_vision, num_tokens=procs.sum(mask.sum()))
                (loss / cfg.grad_accum).backward()
                loss_sum += procs.sum(loss.item()) / cfg.grad_accum
                n_tokens += int(procs.sum(prompt["attention_mask"].sum() + mask.sum()))
            procs.sum_gradients([p for p in model.parameters() if p.requires_grad])
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.grad_clip)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the rate this step's update used (the scheduler now moves on)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            row = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens_per_s": n_tokens / (time.perf_counter() - t0), "epoch": order.epoch}
            if heldout and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                row["eval_loss"] = heldout_loss(model, heldout, cfg.eval_data, processor, device, cfg.batch_size, procs)
            if procs.main:
                log.write(row)
                if tb:
                    for k, v in row.items():
                        tb.add_scalar(k, v, step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{row['lr']:.1e}", tok_s=f"{row['tokens_per_s']:.0f}")
            stop.exit_if_requested(step, cfg.max_steps, save, procs.any)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                save(step)
    except KeyboardInterrupt:  # a second signal: the step in progress is dropped
        sys.exit(ckpt.stopped_at_once_message(cfg.output_dir))
    finally:
        stop.restore()
    bar.close()
    save(step)
    if procs.main:
        log.close()
        if cfg.finetune == "full":  # fp32 master weights (model.keep_fp32_master_weights) saved as the base was
            unwrap(model).to(compute_dtype(model))
        with ckpt.saving("the trained model", cfg.output_dir, cfg.output_dir):
            save_trained(model, processor, cfg.output_dir)
        print(f"saved {'adapter' if cfg.finetune == 'lora' else 'model'} to {cfg.output_dir}")
    if procs.main and cfg.merge_export and cfg.finetune == "lora":
        # The merge loads a second, unquantised base (16.6 GB for the 7B). Everything of training that holds
        # GPU memory goes first: the model, the optimizer (and the scheduler that refers to it), save() that
        # closes over both, and the last loss, whose graph holds the trainable weights (tested). gc.collect()
        # for whatever only a reference cycle still holds; empty_cache() hands the freed blocks back to the
        # driver, so the merge's load is not refused for memory torch's allocator still reserves.
        model = optimizer = scheduler = save = loss = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        export_merged(cfg)
    if procs.main:
        ckpt.release_output_dir(cfg.output_dir)


def export_merged(cfg):
    """Base + adapter as one plain model directory. The base is reloaded unquantised: merging into
    4-bit weights would round the adapter away. Called once the trained model is freed (main); a paged
    8-bit optimizer's states stay (bitsandbytes never frees them), a few hundred MB for a 7B adapter,
    which CUDA moves to the CPU under memory pressure."""
    from dataclasses import replace

    merged_cfg = replace(cfg, quantization="none", gradient_checkpointing=False)
    model, processor = load_model(merged_cfg, adapter=cfg.output_dir, trainable=False)
    out = os.path.join(cfg.output_dir, "merged")
    save_trained(unwrap(model.merge_and_unload()), processor, out)
    print(f"merged model written to {out}")


if __name__ == "__main__":
    try:
        main()
    except InputError as e:  # a missing or unusable input: the message names it, a traceback would bury it
        sys.exit(f"error: {e}")
