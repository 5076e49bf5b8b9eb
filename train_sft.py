"""Stage 1 of PathVLM-R1: supervised fine-tuning on `<think>why</think><answer>X) text</answer>`.

    python train_sft.py configs/sft.yaml               # Qwen2.5-VL-7B, QLoRA, PathMMU SFT split
    python train_sft.py configs/demo_sft.yaml          # the embedded tiny model, demo data (CPU)
    python train_sft.py configs/demo_sft.yaml lr=1e-3 max_steps=50

Reads top to bottom: config -> data (over-long examples dropped and named) -> model -> loop
(micro-batches, gradient accumulation, clipping, cosine schedule, held-out loss; checkpoints
between steps, run.Run) -> save. The loss is on the assistant's tokens only: prompt, image and
padding tokens never enter it.
"""

import dataclasses
import gc
import os
import time

import torch

from pathvlm.config import SFTConfig, parse_args
from pathvlm.errors import run_script
from pathvlm.generation import encode_completions, encode_prompts, image_features
from pathvlm.images import open_image
from pathvlm.inputs import check_inputs
from pathvlm.model import compute_dtype, count_params, load_model, unwrap
from pathvlm.records import Record, image_path, prompt_messages, target_text
from pathvlm.rollout import completion_logprobs
from pathvlm.run import Run, save_trained
from pathvlm.training import (DataOrder, curve_items, load_examples, make_optimizer,
                              make_scheduler)


def batch_tensors(records: list[Record], split_path: str, processor, device):
    """-> prompt inputs (left-padded), completion ids and mask (right-padded). The loss mask is the
    completion mask: exactly the assistant's tokens, EOS included."""
    images = [open_image(image_path(split_path, r)) for r in records]
    prompt = encode_prompts(processor, [prompt_messages(r) for r in records], images, device)
    targets = [target_text(r) for r in records]
    completion_ids, completion_mask = encode_completions(processor.tokenizer, targets, device)
    return prompt, completion_ids, completion_mask


def sft_loss(model, prompt, completion_ids, completion_mask, train_vision: bool = False,
             num_tokens=None):
    """Negative log-likelihood summed over the assistant's tokens, divided by num_tokens: those of
    the micro-batch (its token mean) or, with several processes, of all processes' micro-batches.
    A frozen vision tower runs without grad: with gradient checkpointing, the hook that makes the
    inputs require grad (for the adapters) would otherwise carry the backward pass through every
    vision block."""
    features = None if train_vision else image_features(model, prompt)
    logp = completion_logprobs(model, prompt, completion_ids, completion_mask, features)  # (B, T)
    tokens = completion_mask.sum() if num_tokens is None else num_tokens
    return -(logp * completion_mask).sum() / tokens


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


def describe(cfg, model, n_examples: int, device, procs):
    """The run in one line, printed by the main process."""
    if not procs.main:
        return
    n_trainable, n_total = count_params(model)
    print(f"model {cfg.model} ({cfg.finetune}): {n_trainable:,} trainable of {n_total:,} "
          f"parameters; {n_examples} training examples on {device}; effective batch "
          f"{cfg.batch_size * cfg.grad_accum * procs.world_size} = batch_size {cfg.batch_size} x "
          f"grad_accum {cfg.grad_accum} x {procs.world_size} process(es)")


def main(argv=None):
    cfg = parse_args(SFTConfig, argv)
    check_inputs(cfg)  # splits, images, init_adapter, output_dir: named before the model loads
    run = Run(cfg, "sft")  # processes joined, seeded; output_dir claimed; the checkpoint found
    procs = run.procs  # each takes batch_size examples a micro-step

    model, processor = load_model(cfg, adapter=cfg.init_adapter, lora=cfg.finetune == "lora",
                                  train_vision=cfg.train_vision)
    procs.same_start([p for p in model.parameters() if p.requires_grad])
    device = next(model.parameters()).device
    train = load_examples(cfg.data, processor, cfg.max_len)
    heldout = load_examples(cfg.eval_data, processor, cfg.max_len) if cfg.eval_data else []
    heldout = curve_items(cfg.eval_data, heldout, cfg.eval_items, procs.main) if heldout else []
    describe(cfg, model, len(train), device, procs)

    optimizer = make_optimizer(cfg, model.parameters())
    scheduler = make_scheduler(cfg, optimizer)
    step, loop = run.resume(model, optimizer, scheduler)
    order = DataOrder(len(train), cfg.seed, **(loop["data"] if loop else {}))

    def loop_state():  # saved in every checkpoint beside the weights
        return {"data": order.state()}

    model.train()
    for step in run.steps(step, loop_state):  # Ctrl-C / SIGTERM: finish the step, save, exit
        t0, loss_sum, n_tokens = time.perf_counter(), 0.0, 0
        for _ in range(cfg.grad_accum):
            batch = [train[i] for i in procs.my_part(order.next(cfg.batch_size * procs.world_size))]
            prompt, ids, mask = batch_tensors(batch, cfg.data, processor, device)
            # the token mean over every process's micro-batch: N processes equal one with N x batch
            loss = sft_loss(model, prompt, ids, mask, cfg.train_vision,
                            num_tokens=procs.sum(mask.sum()))
            (loss / cfg.grad_accum).backward()
            loss_sum += procs.sum(loss.item()) / cfg.grad_accum
            n_tokens += int(procs.sum(prompt["attention_mask"].sum() + mask.sum()))
        trainable = [p for p in model.parameters() if p.requires_grad]
        procs.sum_gradients(trainable)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]  # the rate this step's update used (the scheduler moves on)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        row = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": float(grad_norm),
               "tokens_per_s": n_tokens / (time.perf_counter() - t0), "epoch": order.epoch}
        if heldout and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            row["eval_loss"] = heldout_loss(model, heldout, cfg.eval_data, processor, device,
                                            cfg.batch_size, procs)
        run.log(row, loss=f"{loss_sum:.3f}", lr=f"{lr:.1e}", tok_s=f"{row['tokens_per_s']:.0f}")

    def write_model(out_dir):
        if cfg.finetune == "full":  # fp32 master weights (keep_fp32_master_weights) saved as loaded
            unwrap(model).to(compute_dtype(model))
        save_trained(model, processor, out_dir)

    run.finish(step, loop_state, "the trained model", write_model)
    if procs.main:
        print(f"saved {'adapter' if cfg.finetune == 'lora' else 'model'} to {cfg.output_dir}")
    if procs.main and cfg.merge_export and cfg.finetune == "lora":
        # The merge loads a second, unquantised base (16.6 GB for the 7B). Everything of training
        # that holds GPU memory goes first: the model, its trainable weights, the optimizer (and the
        # scheduler that refers to it), and the last loss, whose graph holds those weights (tested);
        # run.finish let go of its own references. gc.collect() for what only a reference cycle
        # still holds; empty_cache() hands the freed blocks back to the driver, so the merge's load
        # is not refused for memory torch's allocator still reserves.
        model = trainable = optimizer = scheduler = loss = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        export_merged(cfg)


def export_merged(cfg):
    """Base + adapter as one plain model directory. The base is reloaded unquantised: merging into
    4-bit weights would round the adapter away. Called once the trained model is freed (main); a
    paged 8-bit optimizer's states stay (bitsandbytes never frees them), a few hundred MB for a 7B
    adapter, which CUDA moves to the CPU under memory pressure."""
    merged_cfg = dataclasses.replace(cfg, quantization="none", gradient_checkpointing=False)
    model, processor = load_model(merged_cfg, adapter=cfg.output_dir, trainable=False)
    out = os.path.join(cfg.output_dir, "merged")
    save_trained(unwrap(model.merge_and_unload()), processor, out)
    print(f"merged model written to {out}")


if __name__ == "__main__":
    run_script(main)
