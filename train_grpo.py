"""Stages β and R1 of PathVLM-R1: GRPO with format, accuracy and (optionally) process rewards.

    python train_grpo.py configs/grpo.yaml                 # 7B QLoRA, stage β (format + accuracy)
    python train_grpo.py configs/grpo_process.yaml         # stage R1: + the cross-modal process reward
    python train_grpo.py configs/demo_grpo.yaml init_adapter=runs/demo/sft output_dir=runs/demo/grpo

One step, top to bottom:
  1. sample G completions for each of B prompts (no grad) and score them (rewards.py); with
     dynamic_sampling, draw more prompts until B groups have rewards that differ
  2. normalise the rewards within each group (grpo.group_advantages)
  3. old and reference log-probs (no grad)
  4. μ updates of grpo.grpo_loss over micro-batches, then one optimizer step
  5. log, write samples, checkpoint
The policy is a LoRA adapter; the reference is a second, frozen adapter on the same base (or the base
itself with adapters disabled), so it costs no second copy of the model.

    torchrun --nproc_per_node 4 train_grpo.py configs/grpo.yaml    # data parallel: README, More than one GPU
Several processes show up as `procs.` calls: each process's slice of the step's prompts, the step's
counts and rewards over all processes, gradients summed before clipping, one log written by the main one.
"""

import contextlib
import dataclasses
import json
import os
import sys
import time

import torch
from tqdm import tqdm
from transformers.modeling_outputs import BaseModelOutputWithPooling

import checkpoint as ckpt
from config import GRPOConfig, parse_args
from evaluation import evaluate, load_sets
from grpo import equal_reward_groups, group_advantages, grpo_loss
from inputs import InputError, check_inputs
from judges import judge_down, judge_from_config
from images import open_image
from mcq import image_path, is_correct, is_well_formed, prompt_messages
from model import (completion_mask, count_params, encode_prompts, freeze_vision_copy, generation_config,
                   image_features, load_model, special_token_ids, stop_token_ids)
from rewards import score_completions
from rollout import Rows, generate_groups, lora_merged, merge_while_sampling
from training import (DataOrder, Processes, load_examples, make_optimizer, make_scheduler, mean_of_scored,
                      open_tensorboard, peak_memory_gib, save_checkpoint, save_trained, start_output_dir)


def is_full_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
        os.path.join(path, "adapter_config.json"))


def reference_context(model, reference: str):
    """Run the enclosed forward pass as the reference policy."""
    if reference == "base":
        return model.disable_adapter()  # LoRA off: exactly the base model's logits

    @contextlib.contextmanager
    def use_sft_adapter():
        model.set_adapter("reference")
        try:
            yield
        finally:
            model.set_adapter("default")  # PEFT's set_adapter also makes 'default' trainable again...
            freeze_vision_copy(model)  # ...and its trained vision tower, which GRPO does not train
    return use_sft_adapter()


def sampling_config(cfg, tokenizer):
    """What the sampler draws from: softmax(logits / temperature) without the special tokens, top_p
    as configured; nothing from the checkpoint's generation_config.json (model.generation_config)."""
    return generation_config(tokenizer, cfg.max_new_tokens, cfg.temperature, cfg.top_p)


@torch.no_grad()
def sample_groups(model, processor, prompt, features, cfg):
    """B prompts -> B*G completions (ids, mask up to and including EOS, texts, truncated flags).
    `features`: the B images' vision outputs, computed once for the whole step."""
    tok = processor.tokenizer
    model.eval()  # no dropout while sampling, and generate keeps its KV cache under checkpointing
    with lora_merged(model, merge_while_sampling(cfg, prompt["input_ids"].device)):
        out = generate_groups(model, prompt, features, cfg.group_size, sampling_config(cfg, tok))
    model.train()
    ids = out[:, prompt["input_ids"].shape[1]:]  # (N, T)
    stop_ids = stop_token_ids(tok)
    truncated = ~torch.isin(ids, torch.tensor(stop_ids, device=ids.device)).any(1)  # (N,): no EOS in max_new_tokens
    mask = completion_mask(ids, stop_ids)  # (N, T)
    ids = ids.masked_fill(mask == 0, tok.pad_token_id)
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    return ids, mask, texts, truncated


def encode_batch(batch, processor, cfg, device) -> dict:
    """B records -> their prompts with their images, left-padded to the longest."""
    images = [open_image(image_path(cfg.data, r)) for r in batch]
    return encode_prompts(processor, [prompt_messages(r) for r in batch], images, device)


def sample_and_score(batch, model, processor, cfg, judge) -> dict:
    """B records -> their prompts, image features, B*G sampled completions and every reward of them."""
    prompt = encode_batch(batch, processor, cfg, next(model.parameters()).device)
    features = image_features(model, prompt)  # vision tower once per step, shared by every pass
    ids, mask, texts, truncated = sample_groups(model, processor, prompt, features, cfg)
    records = [r for r in batch for _ in range(cfg.group_size)]  # (N,) the record of each completion
    details = {}  # the process reward's components, logged beside the rewards (not part of the total)
    scores = score_completions(cfg.rewards, texts, records, judge=judge,
                               image_paths=[image_path(cfg.data, r) for r in records],
                               require_format=cfg.accuracy_requires_format,
                               open_answer_reward=cfg.open_answer_reward, details=details)
    scores.update(details)
    return dict(batch=batch, prompt=prompt, features=features, ids=ids, mask=mask, texts=texts,
                truncated=truncated, records=records, scores=scores)


def informative_groups(sampled: dict, sample_more, cfg, procs, processor) -> tuple[dict, torch.Tensor, dict]:
    """DAPO's dynamic sampling: groups whose rewards are all equal have advantage 0 and teach nothing, so
    they are dropped and more prompts are drawn (sample_more()) until num_prompts groups differ, or
    max_sampling_rounds is reached; then the step goes on with what it has, filled up with dropped groups
    that get no loss (every process keeps num_prompts groups). -> (the step's groups, a (B,) bool: filler,
    counts for the log)."""
    G, kept, spare, rounds = cfg.group_size, [], [], 0
    while True:
        rounds += 1
        rewards = torch.tensor(sampled["scores"]["total"]).view(-1, G)  # (B, G)
        for b, equal in enumerate((rewards == rewards[:, :1]).all(1).tolist()):
            (spare if equal else kept).append((sampled, b))
        # every process draws as long as any still needs groups: the data order is one for all of them
        if not procs.any(len(kept) < cfg.num_prompts) or rounds == cfg.max_sampling_rounds:
            break
        sampled = sample_more()
    drawn, dropped = rounds * cfg.num_prompts, len(spare)  # dropped: every equal-reward group drawn
    chosen = (kept + spare)[:cfg.num_prompts]
    filler = torch.tensor([i >= len(kept) for i in range(len(chosen))])
    batch = [s["batch"][b] for s, b in chosen]
    rows = [(s, b * G + g) for s, b in chosen for g in range(G)]
    device = sampled["ids"].device
    width = max(s["ids"].shape[1] for s, _ in rows)  # completions right-padded to the longest
    pad = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
    # the chosen prompts under one left-padding; their image features as each round computed them
    features = BaseModelOutputWithPooling(pooler_output=[s["features"]["image"].pooler_output[b] for s, b in chosen])
    groups = dict(batch=batch, prompt=encode_batch(batch, processor, cfg, device), features={"image": features},
                  ids=torch.cat([pad(s["ids"][i:i + 1], processor.tokenizer.pad_token_id) for s, i in rows]),
                  mask=torch.cat([pad(s["mask"][i:i + 1], 0) for s, i in rows]),
                  texts=[s["texts"][i] for s, i in rows], truncated=torch.stack([s["truncated"][i] for s, i in rows]),
                  records=[s["records"][i] for s, i in rows],
                  scores={k: [s["scores"][k][i] for s, i in rows] for k in sampled["scores"]})
    return groups, filler, {"groups_drawn": drawn, "groups_dropped": dropped, "groups_short": int(filler.sum())}


@torch.no_grad()
def logprobs_no_grad(model, rows: Rows, micro_batch: int, cfg) -> torch.Tensor:
    """Reference or old-policy log-probs, (N, T), each prompt run once for its G completions. In
    eval mode: no dropout, and transformers keeps the KV cache under gradient checkpointing."""
    model.eval()
    logp = torch.cat([rows.logprobs(model, i, micro_batch, cfg.logprob_chunk, share_prompt=True)
                      for i in range(0, rows.ids.shape[0], micro_batch)])
    model.train()
    return logp


def main(argv=None):
    cfg = parse_args(GRPOConfig, argv)
    check_inputs(cfg)  # splits, images, init_adapter, judge key, output_dir: named now, not after the model loads
    procs = Processes(cfg.collective_timeout)  # one, or N under torchrun / accelerate launch: each samples num_prompts prompts a step
    # each process its own sampling stream (else N processes would draw the same random numbers)
    ckpt.seed_everything(cfg.seed + 1000 * procs.rank)
    if cfg.init_adapter and is_full_model(cfg.init_adapter):
        # finetune=full SFT wrote a whole model: it becomes the base, the policy a new LoRA on it, and
        # the SFT reference is that base with the adapter disabled
        print(f"init_adapter {cfg.init_adapter} is a full model: using it as the base with a new LoRA")
        cfg.model, cfg.init_adapter = cfg.init_adapter, None
        cfg.reference = "base" if cfg.reference == "sft" else cfg.reference
    resume_from = start_output_dir(cfg, procs)  # claimed for this run; the checkpoint to resume, if any

    model, processor = load_model(cfg, adapter=cfg.init_adapter)
    if cfg.reference == "sft" and cfg.kl_coef != 0:
        model.load_adapter(cfg.init_adapter, adapter_name="reference", is_trainable=False)
        model.set_adapter("default")
        freeze_vision_copy(model)
    procs.same_start([p for p in model.parameters() if p.requires_grad])
    device = next(model.parameters()).device
    tok = processor.tokenizer
    train = load_examples(cfg.data, processor, cfg.max_prompt_len, with_target=False, max_len_key="max_prompt_len")
    heldout = load_sets([f"heldout={cfg.eval_data}"], cfg.eval_items) if cfg.eval_data and cfg.eval_every else {}
    judge = judge_from_config(cfg, model, processor)  # None for judge=none
    n_trainable, n_total = count_params(model)
    if procs.main:
        print(f"policy: LoRA on {cfg.model}, {n_trainable:,} trainable of {n_total:,} parameters; reference: "
              f"{cfg.reference if cfg.kl_coef else 'none (kl_coef=0)'}; {len(train)} prompts; B={cfg.num_prompts} "
              f"per process x {procs.world_size} process(es), G={cfg.group_size}: "
              f"{cfg.num_prompts * procs.world_size * cfg.group_size} completions a step; rewards {cfg.rewards}")

    optimizer = make_optimizer(cfg, model.parameters())
    scheduler = make_scheduler(cfg, optimizer)
    order, step, counters = DataOrder(len(train), cfg.seed), 0, {"bad_steps": 0, "skipped_steps": 0}
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    samples_path = os.path.join(cfg.output_dir, "samples.jsonl")
    if resume_from:
        loop = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, procs.rank, procs.world_size)
        step, order, counters = loop["step"], DataOrder(len(train), cfg.seed, **loop["data"]), loop["counters"]
        if judge:
            judge.stats.add(**counters.get("judge", {}))
        if procs.main:
            print(f"resumed from {resume_from} at step {step}")
    if procs.main:  # the logs hold the run being resumed or started: rows of a run not checkpointed go
        ckpt.truncate_metrics(metrics_path, step)
        ckpt.truncate_metrics(samples_path, step)
    procs.barrier()  # the files are truncated before anyone appends
    # the main process writes the logs; the others send it their part of each step
    log, tb = (ckpt.MetricsLog(metrics_path), open_tensorboard(cfg)) if procs.main else (None, None)
    samples = open(samples_path, "a") if procs.main else None
    G = cfg.group_size
    micro_batch = max(G, cfg.micro_batch_size // G * G)  # whole groups, so a prompt is run once per pass

    def save(at_step):
        if judge:  # its counters go on from here after a resume, so the logged rows match an unbroken run
            counters["judge"] = judge.stats.as_dict()
        return save_checkpoint(procs, cfg.output_dir, at_step, model, optimizer, scheduler,
                               {"data": order.state(), "counters": counters, "config": dataclasses.asdict(cfg)},
                               keep=cfg.keep_checkpoints,
                               save_model=lambda d: model.save_pretrained(d, selected_adapters=["default"]))

    bar = tqdm(total=cfg.max_steps, initial=step, desc="grpo", dynamic_ncols=True, disable=not procs.main)
    stop = ckpt.StopAfterStep()  # Ctrl-C / SIGTERM: finish the step, save, exit (resume is then exact)
    try:
        while step < cfg.max_steps:
            t_start = time.perf_counter()
            # 1. sample G completions per prompt and score them (rewards.py) -----------------------
            def draw_and_sample():
                batch = [train[i] for i in procs.my_part(order.next(cfg.num_prompts * procs.world_size))]
                return sample_and_score(batch, model, processor, cfg, judge)

            sampled, filler, sampling = draw_and_sample(), torch.zeros(cfg.num_prompts, dtype=torch.bool), {}
            if cfg.dynamic_sampling:  # DAPO: drop groups whose rewards are all equal, draw more prompts
                sampled, filler, sampling = informative_groups(sampled, draw_and_sample, cfg, procs, processor)
            prompt, features, ids, mask = (sampled[k] for k in ("prompt", "features", "ids", "mask"))
            texts, truncated, records, scores = (sampled[k] for k in ("texts", "truncated", "records", "scores"))
            t_generated = time.perf_counter()  # sampling and rewards

            # 2. advantages --------------------------------------------------------------------------
            rewards = torch.tensor(scores["total"], dtype=torch.float32, device=device)  # (N,)
            # dynamic sampling's filler groups are no part of the step: no advantage, no loss, not counted
            counted = ~filler.to(device).repeat_interleave(G)  # (N,)
            # over every process's rewards: scale_rewards=batch divides by the std of the whole step's
            advantages = procs.my_part(group_advantages(procs.cat(rewards), G, cfg.scale_rewards,
                                                        counted=procs.cat(counted.float()).bool()))  # (N,)
            equal = equal_reward_groups(rewards, G)  # (B,)
            keep = counted.clone()  # (N,): the rows that get a loss
            if cfg.skip_equal_groups:
                keep &= ~equal.repeat_interleave(G)
            loss_mask = mask * keep[:, None]
            if cfg.mask_truncated:
                loss_mask = loss_mask * (~truncated)[:, None]

            # 3. old and reference log-probs (no grad) -----------------------------------------------
            rows = Rows(model, prompt, features, ids, mask, G, cfg.temperature, special_token_ids(tok))
            ref_logp = None
            if cfg.kl_coef != 0:
                with reference_context(model, cfg.reference):
                    ref_logp = logprobs_no_grad(model, rows, micro_batch, cfg)
            # μ = 1: π_old is the policy being updated, so ρ = 1 and old_logp is logp.detach() (one
            # pass saved); μ > 1: π_old is frozen before the first update
            old_logp = logprobs_no_grad(model, rows, micro_batch, cfg) if cfg.num_iterations > 1 else None
            t_scored = time.perf_counter()

            # 4. μ policy updates ----------------------------------------------------------------
            # grpo_loss divides by the step's sequences and tokens, all processes' together, not the
            # micro-batch's: micro-batches of any sizes, on any number of processes, add up to the loss
            # of one pass over the whole step (bnpo: this process's tokens, its mean over processes)
            n_rows, all_tokens = max(procs.sum(counted.sum()), 1.0), max(procs.sum(loss_mask.sum()), 1.0)
            n_tokens = all_tokens if cfg.loss_type != "bnpo" else max(float(loss_mask.sum()), 1.0) * procs.world_size
            loss_total, kl_sum, clip_sum, finite = 0.0, 0.0, 0.0, bool(torch.isfinite(rewards).all())
            for _ in range(cfg.num_iterations):
                for i in range(0, ids.shape[0], micro_batch):  # this process's rows
                    if not finite:
                        break
                    sl = slice(i, i + micro_batch)
                    logp = rows.logprobs(model, i, micro_batch, cfg.logprob_chunk,  # (micro_batch, T)
                                         share_prompt=True)
                    loss, stats = grpo_loss(logp, logp.detach() if old_logp is None else old_logp[sl],
                                            None if ref_logp is None else ref_logp[sl], advantages[sl], loss_mask[sl],
                                            cfg.clip_eps, cfg.clip_eps_high, cfg.kl_coef, cfg.loss_type,
                                            cfg.max_new_tokens, n_rows, n_tokens)
                    finite = bool(torch.isfinite(loss))
                    if finite:
                        loss.backward()
                        share = float(loss_mask[sl].sum()) / all_tokens  # of the step's tokens: weighs its stats
                        loss_total, kl_sum = loss_total + loss.item(), kl_sum + stats["kl"] * share
                        clip_sum += stats["clip_frac"] * share
                finite = procs.all(finite)  # every process takes the same branch
                if finite:
                    procs.sum_gradients([p for p in model.parameters() if p.requires_grad])
                    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                               cfg.grad_clip)
                    finite = bool(torch.isfinite(grad_norm))
                if finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # also when skipped: no gradient may carry into the next step
                if not finite:
                    break
            lr = scheduler.get_last_lr()[0]  # the rate this step's update used (the scheduler now moves on)
            scheduler.step()
            step += 1
            if not finite:
                counters["bad_steps"] += 1
                counters["skipped_steps"] += 1
                print(f"\nstep {step}: non-finite loss, reward or gradient; update skipped "
                      f"({counters['bad_steps']} in a row)", file=sys.stderr)
                if counters["bad_steps"] >= cfg.max_bad_steps:
                    path = save(step)
                    sys.exit(f"{cfg.max_bad_steps} non-finite steps in a row: stopped; last state saved to {path}. "
                             "Lower lr or check the rewards.")
            else:
                counters["bad_steps"] = 0
            t_end = time.perf_counter()

            # 5. log: every process's completions, merged in rank order; the main process writes ------
            merged = procs.merge({"texts": texts, "records": records, "scores": scores,
                                  "lengths": mask.sum(1).tolist(), "truncated": truncated.tolist(),
                                  "equal": int(equal.sum()), "loss": loss_total, "kl": kl_sum, "clip": clip_sum,
                                  "judge": judge.stats.as_dict() if judge else {},
                                  "tokens": int(rows.prompt["attention_mask"].sum() + mask.sum()), **sampling})
            lengths = torch.tensor(merged["lengths"], dtype=torch.float32)
            correct = [is_correct(t, r) for t, r in zip(merged["texts"], merged["records"])]
            row = {"step": step, "loss": merged["loss"] / cfg.num_iterations, "lr": lr,
                   **{f"reward/{k}": mean_of_scored(v) for k, v in merged["scores"].items()},
                   "accuracy": sum(correct) / len(correct),
                   "format_rate": sum(map(is_well_formed, merged["texts"])) / len(correct),
                   "kl": merged["kl"] / cfg.num_iterations, "clip_frac": merged["clip"] / cfg.num_iterations,
                   "completion_len_mean": lengths.mean().item(), "completion_len_max": lengths.max().item(),
                   "truncated_frac": sum(merged["truncated"]) / len(correct), "equal_reward_groups": merged["equal"],
                   "gen_tokens_per_s": lengths.sum().item() / (t_generated - t_start),
                   "train_tokens_per_s": cfg.num_iterations * merged["tokens"] / (t_end - t_scored),
                   "step_s": t_end - t_start, "gen_s": t_generated - t_start,
                   "score_logprob_s": t_scored - t_generated, "train_s": t_end - t_scored,
                   "peak_mem_gib": peak_memory_gib(device),  # the main process's
                   "skipped_steps": counters["skipped_steps"], **{f"judge/{k}": v for k, v in merged["judge"].items()},
                   **{k: merged[k] for k in sampling}}
            if heldout and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                # greedy answers on the held-out split: no sampling, so the RNG stream (and resume) is untouched
                held = evaluate(model, processor, heldout, cfg.micro_batch_size, cfg.max_new_tokens, log=lambda _: None,
                                procs=procs)
                row.update(eval_accuracy=held["heldout"]["accuracy"], eval_format_rate=held["heldout"]["format_rate"])
            if procs.main:
                log.write(row)
                if tb:
                    for k, v in row.items():
                        if v is not None:
                            tb.add_scalar(k, v, step)
                if cfg.sample_every and step % cfg.sample_every == 0:
                    shown = list(zip(merged["texts"], merged["records"], merged["scores"]["total"]))
                    for t, r, rew in shown[:G * cfg.log_groups] if cfg.log_groups else shown:
                        samples.write(json.dumps({"step": step, "id": r.id, "gold": r.answer, "reward": rew,
                                                  "completion": t}) + "\n")
                    samples.flush()
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward/total']:.2f}", acc=f"{row['accuracy']:.2f}",
                            fmt=f"{row['format_rate']:.2f}", kl=f"{row['kl']:.3f}", len=f"{row['completion_len_mean']:.0f}")
            stop.exit_if_requested(step, cfg.max_steps, save, procs.any)
            # a judge that is down would turn the process reward into its fallback: stop, resumable
            down = judge and judge_down(judge, cfg.judge_max_failure_share, cfg.judge_failure_window)
            if procs.any(bool(down)):
                path = save(step)
                sys.exit(f"{down or 'the judge of another process is down'}. Stopped after step {step}; "
                         f"resume from {path} with the same command once the judge answers")
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
        samples.close()
        with ckpt.saving("the trained adapter", cfg.output_dir, cfg.output_dir):
            save_trained(model, processor, cfg.output_dir, selected_adapters=["default"])  # the policy, not the reference
        print(f"saved the policy adapter to {cfg.output_dir}")
        ckpt.release_output_dir(cfg.output_dir)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:  # a missing or unusable input: the message names it, a traceback would bury it
        sys.exit(f"error: {e}")
