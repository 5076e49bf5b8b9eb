"""Stages β and R1 of PathVLM-R1: GRPO with format, accuracy and (optionally) process rewards.

    python train_grpo.py configs/grpo.yaml              # 7B QLoRA, stage β (format + accuracy)
    python train_grpo.py configs/grpo_process.yaml      # stage R1: + the cross-modal process reward
    python train_grpo.py configs/demo_grpo.yaml init_adapter=runs/demo/sft output_dir=runs/demo/grpo

One step, top to bottom (main's loop):
  1. sample G completions for each of B prompts (no grad) and score them (rewards.py); with
     dynamic_sampling, draw more prompts until B groups have rewards that differ
  2. normalise the rewards within each group (grpo.group_advantages)
  3. reference and old log-probs (no grad)
  4. update_policy: μ updates of grpo.grpo_loss over micro-batches, one optimizer step each
  5. log (step_metrics), write samples; checkpoints between steps (run.Run)
The policy is a LoRA adapter; the reference is a second, frozen adapter on the same base (or the
base itself with adapters disabled), so it costs no second copy of the model.

    torchrun --nproc_per_node 4 train_grpo.py configs/grpo.yaml   # data parallel: docs/multi-gpu.md
Several processes show up as `procs.` calls: each process's slice of the step's prompts, the step's
counts and rewards over all processes, gradients summed before clipping, one log written by the
main one.
"""

import contextlib
import json
import os
import sys
import time

import torch

from pathvlm.answers import canonical, is_correct, is_well_formed
from pathvlm.config import GRPOConfig, parse_args
from pathvlm.errors import run_script
from pathvlm.evaluation import evaluate, load_sets
from pathvlm.generation import encode_prompts, image_features, special_token_ids
from pathvlm.grpo import equal_reward_groups, group_advantages, grpo_loss, step_normalisers
from pathvlm.images import open_image
from pathvlm.inputs import check_inputs
from pathvlm.judges import judge_from_config
from pathvlm.model import count_params, freeze_vision_copy, load_model
from pathvlm.records import image_path, prompt_messages
from pathvlm.rollout import Rows, informative_groups, lora_merged, merge_while_sampling
from pathvlm.run import Run, save_trained
from pathvlm.sampler import Completions, add_gap, gap_metrics, sample, sampler_settings
from pathvlm.training import (DataOrder, curve_items, load_examples, make_optimizer,
                              make_scheduler, mean_of_scored, peak_memory_gib)
from pathvlm.verdicts import judge_down
from rewards import REWARDS, score_completions


def use_full_model_as_base(cfg):
    """finetune=full SFT wrote a whole model, not an adapter: it becomes the base, the policy a new
    LoRA on it, and the SFT reference is that base with the adapter disabled."""
    path = cfg.init_adapter
    if path and os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
            os.path.join(path, "adapter_config.json")):
        print(f"init_adapter {path} is a full model: using it as the base with a new LoRA")
        cfg.model, cfg.init_adapter = path, None
        cfg.reference = "base" if cfg.reference == "sft" else cfg.reference


def load_policy(cfg):
    """The policy: LoRA adapter 'default' (init_adapter's, or new). With reference=sft and a KL
    term, init_adapter again as a second, frozen adapter on the same base: a reference at no
    model's cost."""
    model, processor = load_model(cfg, adapter=cfg.init_adapter)
    if cfg.reference == "sft" and cfg.kl_coef != 0:
        model.load_adapter(cfg.init_adapter, adapter_name="reference", is_trainable=False)
        model.set_adapter("default")
        freeze_vision_copy(model)
    return model, processor


def load_splits(cfg, processor, procs_main: bool) -> tuple[list, dict]:
    """The RL prompts (those over max_prompt_len dropped and counted), and the held-out items
    answered greedily every eval_every steps, if any (training.curve_items: a stratified sample)."""
    train = load_examples(cfg.data, processor, cfg.max_prompt_len, with_target=False,
                          max_len_key="max_prompt_len")
    if not (cfg.eval_data and cfg.eval_every):
        return train, {}
    heldout = load_sets([f"heldout={cfg.eval_data}"])["heldout"]
    return train, {"heldout": curve_items(cfg.eval_data, heldout, cfg.eval_items, procs_main)}


def describe(cfg, model, n_prompts: int, procs):
    """The run in one line, printed by the main process."""
    if not procs.main:
        return
    n_trainable, n_total = count_params(model)
    reference = cfg.reference if cfg.kl_coef else "none (kl_coef=0)"
    world_size = procs.world_size
    print(f"policy: LoRA on {cfg.model}, {n_trainable:,} trainable of {n_total:,} parameters; "
          f"reference: {reference}; {n_prompts} prompts; B={cfg.num_prompts} per process x "
          f"{world_size} process(es), G={cfg.group_size}: "
          f"{cfg.num_prompts * world_size * cfg.group_size} completions a step; "
          f"rewards {cfg.rewards}")


def policy_saver(model):
    """What each checkpoint holds besides the state: the policy as a loadable adapter (not the
    reference), so a checkpoint can be evaluated as it is."""
    return lambda path: model.save_pretrained(path, selected_adapters=["default"])


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
            model.set_adapter("default")  # PEFT's set_adapter makes 'default' trainable again...
            freeze_vision_copy(model)  # ...and its trained vision tower, which GRPO does not train
    return use_sft_adapter()


# ----------------------------------------------------------------------------------------------
# 1. sample and score

@torch.no_grad()
def sample_groups(model, processor, prompt, features, cfg) -> tuple[Completions, list[str]]:
    """B prompts -> B*G completions (sampler.Completions) and their texts. `features`: the B
    images' vision outputs, computed once for the whole step."""
    model.eval()  # no dropout while sampling, and generate keeps its KV cache under checkpointing
    device = prompt["input_ids"].device
    with lora_merged(model, merge_while_sampling(cfg, device)):
        out = sample(model, processor.tokenizer, prompt, features,
                     max_new_tokens=cfg.max_new_tokens, group_size=cfg.group_size,
                     temperature=cfg.temperature, top_p=cfg.top_p, **sampler_settings(cfg, device))
    model.train()
    return out, processor.tokenizer.batch_decode(out.ids, skip_special_tokens=True)


def encode_batch(batch, processor, cfg, device) -> dict:
    """B records -> their prompts with their images, left-padded to the longest."""
    images = [open_image(image_path(cfg.data, r)) for r in batch]
    return encode_prompts(processor, [prompt_messages(r) for r in batch], images, device)


def sample_and_score(batch, model, processor, cfg, judge) -> dict:
    """B records -> their prompts, image features, B*G sampled completions, every reward of them."""
    prompt = encode_batch(batch, processor, cfg, next(model.parameters()).device)
    features = image_features(model, prompt)  # vision tower once per step, shared by every pass
    out, texts = sample_groups(model, processor, prompt, features, cfg)
    records = [r for r in batch for _ in range(cfg.group_size)]  # (N,) each completion's record
    details = {}  # the process reward's components, logged beside the rewards (not in the total)
    scores = score_completions(cfg.rewards, texts, records, judge=judge,
                               image_paths=[image_path(cfg.data, r) for r in records],
                               require_format=cfg.accuracy_requires_format,
                               open_answer_reward=cfg.open_answer_reward, details=details)
    scores.update(details)
    return dict(batch=batch, prompt=prompt, features=features, ids=out.ids, mask=out.mask,
                logprobs=out.logprobs, truncated=out.truncated, texts=texts, records=records,
                scores=scores)


# ----------------------------------------------------------------------------------------------
# 3-4. log-probs and the policy update

def micro_batch_size(cfg) -> int:
    """Completions per log-prob pass: whole groups, so that each prompt is run once per pass."""
    return max(cfg.group_size, cfg.micro_batch_size // cfg.group_size * cfg.group_size)


@torch.no_grad()
def logprobs_no_grad(model, rows: Rows, cfg) -> torch.Tensor:
    """Reference or old-policy log-probs, (N, T), each prompt run once for its G completions. In
    eval mode: no dropout, and transformers keeps the KV cache under gradient checkpointing."""
    model.eval()
    size = micro_batch_size(cfg)
    logp = torch.cat([rows.logprobs(model, i, size, cfg.logprob_chunk, share_prompt=True)
                      for i in range(0, rows.ids.shape[0], size)])
    model.train()
    return logp


def update_policy(model, optimizer, scheduler, rows: Rows, advantages, loss_mask, counted, old_logp,
                  ref_logp, sampler_logp, *, step: int, counters: dict, cfg, procs) -> dict:
    """μ = num_iterations updates of grpo_loss over this process's rows, micro-batch by
    micro-batch, one optimizer step each, the gradients summed over the processes first. A
    non-finite reward, loss or gradient skips the update (every process takes the same branch),
    counted in counters.
    -> the step's loss, KL, clipped fraction and learning rate, whether it was finite, and the
    sampler's gap to the first update's log-probs (sampler.add_gap), for the log."""
    # grpo_loss divides by the step's sequences and tokens, all processes' together: micro-batches
    # of any sizes, on any number of processes, add up to the loss of one pass over the whole step
    num_sequences, num_tokens, all_tokens = step_normalisers(cfg.loss_type, counted, loss_mask,
                                                             procs.sum, procs.world_size)
    trainable, size = [p for p in model.parameters() if p.requires_grad], micro_batch_size(cfg)
    # a non-finite reward makes its group's advantages non-finite
    loss_total, kl_sum, clip_sum, gap = 0.0, 0.0, 0.0, [0.0, 0, 0.0]  # gap: sampler.add_gap
    finite = bool(torch.isfinite(advantages).all())
    for iteration in range(cfg.num_iterations):
        for i in range(0, rows.ids.shape[0], size):
            if not finite:
                break
            part = slice(i, i + size)
            logp = rows.logprobs(model, i, size, cfg.logprob_chunk, share_prompt=True)  # (size, T)
            if iteration == 0 and sampler_logp is not None:  # the weights the sampler used
                gap = add_gap(gap, logp.detach(), sampler_logp[part], rows.mask[part])
            loss, stats = grpo_loss(
                logp=logp, old_logp=logp.detach() if old_logp is None else old_logp[part],
                ref_logp=None if ref_logp is None else ref_logp[part], advantages=advantages[part],
                mask=loss_mask[part], clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                kl_coef=cfg.kl_coef, loss_type=cfg.loss_type, max_completion_len=cfg.max_new_tokens,
                num_sequences=num_sequences, num_tokens=num_tokens)
            finite = bool(torch.isfinite(loss))
            if finite:
                loss.backward()
                share = float(loss_mask[part].sum()) / all_tokens  # its stats' weight
                loss_total, kl_sum = loss_total + loss.item(), kl_sum + stats["kl"] * share
                clip_sum += stats["clip_frac"] * share
        finite = procs.all(finite)  # every process takes the same branch
        if finite:
            procs.sum_gradients(trainable)
            finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)))
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # also when skipped: no gradient carries over
        if not finite:
            break
    lr = scheduler.get_last_lr()[0]  # the rate this step's update used (the scheduler now moves on)
    scheduler.step()
    counters["bad_steps"] = 0 if finite else counters["bad_steps"] + 1
    counters["skipped_steps"] += not finite
    if not finite:
        print(f"\nstep {step}: non-finite loss, reward or gradient; update skipped "
              f"({counters['bad_steps']} in a row)", file=sys.stderr)
    return {"loss": loss_total, "kl": kl_sum, "clip": clip_sum, "lr": lr, "finite": finite,
            "gap": gap if sampler_logp is not None else None}


# ----------------------------------------------------------------------------------------------
# 5. log

def step_record(sampled: dict, update: dict, equal, rows: Rows, judge, sampling: dict) -> dict:
    """This process's part of the step's log: its completions, their scores, its update's sums."""
    mask = sampled["mask"]
    return {"texts": sampled["texts"], "records": sampled["records"], "scores": sampled["scores"],
            "lengths": mask.sum(1).tolist(), "truncated": sampled["truncated"].tolist(),
            "equal": int(equal.sum()), "loss": update["loss"], "kl": update["kl"],
            "clip": update["clip"], "judge": judge.stats.as_dict() if judge else {},
            "gap": [update["gap"]] if update["gap"] else [],  # a list: merged by concatenation
            "tokens": int(rows.prompt["attention_mask"].sum() + mask.sum()), **sampling}


def step_metrics(step: int, merged: dict, update: dict, times: dict, counters: dict, cfg,
                 device) -> dict:
    """One row of metrics.jsonl: every process's step_record (merged), the update, the times."""
    lengths = torch.tensor(merged["lengths"], dtype=torch.float32)
    n = len(merged["texts"])
    texts = [canonical(t) for t in merged["texts"]]  # as the rewards read them
    correct = sum(is_correct(t, r) for t, r in zip(texts, merged["records"]))
    gen_s = times["generated"] - times["start"]
    train_s = times["end"] - times["scored"]
    iterations = cfg.num_iterations  # μ
    return {"step": step, "loss": merged["loss"] / iterations, "lr": update["lr"],
            **{f"reward/{k}": mean_of_scored(v) for k, v in merged["scores"].items()},
            "accuracy": correct / n, "format_rate": sum(map(is_well_formed, texts)) / n,
            "kl": merged["kl"] / iterations, "clip_frac": merged["clip"] / iterations,
            "completion_len_mean": lengths.mean().item(),
            "completion_len_max": lengths.max().item(),
            "truncated_frac": sum(merged["truncated"]) / n, "equal_reward_groups": merged["equal"],
            "gen_tokens_per_s": lengths.sum().item() / gen_s,
            "train_tokens_per_s": iterations * merged["tokens"] / train_s,
            "step_s": times["end"] - times["start"], "gen_s": gen_s,
            "score_logprob_s": times["scored"] - times["generated"], "train_s": train_s,
            "peak_mem_gib": peak_memory_gib(device),  # the main process's
            "skipped_steps": counters["skipped_steps"],
            **gap_metrics(merged["gap"]),
            **{f"judge/{k}": v for k, v in merged["judge"].items()},
            **{k: merged[k] for k in ("groups_drawn", "groups_dropped", "groups_short")
               if k in merged}}


def write_samples(file, step: int, merged: dict, cfg):
    """Some groups' completions beside their rewards (log_groups of them; 0: all)."""
    shown = list(zip(merged["texts"], merged["records"], merged["scores"]["total"]))
    if cfg.log_groups:
        shown = shown[:cfg.group_size * cfg.log_groups]
    for text, record, reward in shown:
        file.write(json.dumps({"step": step, "id": record.id, "gold": record.answer,
                               "reward": reward, "completion": text}) + "\n")
    file.flush()


def main(argv=None):
    cfg = parse_args(GRPOConfig, argv, names={"rewards": REWARDS})  # rewards.py owns their names
    check_inputs(cfg)  # splits, images, adapter, judge key, output_dir: before the model loads
    use_full_model_as_base(cfg)
    run = Run(cfg, "grpo", logs=("metrics.jsonl", "samples.jsonl"))  # output_dir claimed, seeded
    procs, G = run.procs, cfg.group_size  # each process samples num_prompts prompts a step

    model, processor = load_policy(cfg)
    procs.same_start([p for p in model.parameters() if p.requires_grad])
    device = next(model.parameters()).device
    train, heldout = load_splits(cfg, processor, procs.main)
    judge = judge_from_config(cfg, model, processor)  # None for judge=none
    describe(cfg, model, len(train), procs)

    optimizer = make_optimizer(cfg, model.parameters())
    scheduler = make_scheduler(cfg, optimizer)
    step, loop = run.resume(model, optimizer, scheduler, save_model=policy_saver(model))
    order = DataOrder(len(train), cfg.seed, **(loop["data"] if loop else {}))
    counters = loop["counters"] if loop else {"bad_steps": 0, "skipped_steps": 0}
    if judge and loop:  # its counters go on, so the logged rows match an unbroken run
        judge.stats.add(**counters.get("judge", {}))

    def loop_state():  # saved in every checkpoint beside the weights
        judged = {"judge": judge.stats.as_dict()} if judge else {}
        return {"data": order.state(), "counters": {**counters, **judged}}

    def draw_and_sample():  # each process's next num_prompts prompts, G completions each, scored
        batch = [train[i] for i in procs.my_part(order.next(cfg.num_prompts * procs.world_size))]
        return sample_and_score(batch, model, processor, cfg, judge)

    for step in run.steps(step, loop_state):  # Ctrl-C / SIGTERM: finish the step, save, exit
        times = {"start": time.perf_counter()}
        # 1. sample G completions per prompt and score them (rewards.py) ---------------------
        sampled, sampling = draw_and_sample(), {}
        filler = torch.zeros(cfg.num_prompts, dtype=torch.bool)  # (B,) groups that take no part
        if cfg.dynamic_sampling:  # DAPO: drop groups whose rewards are all equal, draw more prompts
            sampled, filler, sampling = informative_groups(
                sampled, draw_and_sample, cfg, procs.any,
                lambda b: encode_batch(b, processor, cfg, device), processor.tokenizer.pad_token_id)
        ids, mask, truncated, scores = (sampled[k] for k in ("ids", "mask", "truncated", "scores"))
        times["generated"] = time.perf_counter()

        # 2. advantages: each completion's reward against its group's ------------------------
        rewards = torch.tensor(scores["total"], dtype=torch.float32, device=device)  # (N,)
        counted = ~filler.to(device).repeat_interleave(G)  # (N,) filler groups take no part
        # over every process's rewards: scale_rewards=batch divides by the whole step's std
        advantages = procs.my_part(group_advantages(procs.cat(rewards), G, cfg.scale_rewards,
                                                    counted=procs.cat(counted.float()).bool()))
        equal = equal_reward_groups(rewards, G)  # (B,)
        keep = counted & ~equal.repeat_interleave(G) if cfg.skip_equal_groups else counted  # (N,)
        loss_mask = mask * keep[:, None]  # (N, T)
        if cfg.mask_truncated:  # completions cut at max_new_tokens get no loss
            loss_mask = loss_mask * (~truncated)[:, None]

        # 3. reference and old log-probs (no grad) -------------------------------------------
        rows = Rows(model, sampled["prompt"], sampled["features"], ids, mask, G, cfg.temperature,
                    special_token_ids(processor.tokenizer))
        ref_logp = None
        if cfg.kl_coef != 0:
            with reference_context(model, cfg.reference):
                ref_logp = logprobs_no_grad(model, rows, cfg)
        # μ = 1: π_old is the policy being updated, so ρ = 1 and old_logp is logp.detach()
        old_logp = logprobs_no_grad(model, rows, cfg) if cfg.num_iterations > 1 else None
        times["scored"] = time.perf_counter()

        # 4. μ policy updates, one optimizer step each ----------------------------------------
        update = update_policy(model, optimizer, scheduler, rows, advantages, loss_mask, counted,
                               old_logp, ref_logp, sampled["logprobs"], step=step,
                               counters=counters, cfg=cfg, procs=procs)
        if counters["bad_steps"] >= cfg.max_bad_steps:
            sys.exit(f"{cfg.max_bad_steps} non-finite steps in a row: stopped; last state saved to "
                     f"{run.save(step, loop_state())}. Lower lr or check the rewards.")
        times["end"] = time.perf_counter()

        # 5. log: every process's part, merged in rank order; the main process writes ----------
        merged = procs.merge(step_record(sampled, update, equal, rows, judge, sampling))
        row = step_metrics(step, merged, update, times, counters, cfg, device)
        if heldout and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            # greedy answers on the held-out split: no sampling, the RNG (and resume) untouched
            held = evaluate(model, processor, heldout, cfg.micro_batch_size, cfg.max_new_tokens,
                            log=lambda _: None, procs=procs,
                            **sampler_settings(cfg, device))["heldout"]
            row.update(eval_accuracy=held["accuracy"], eval_format_rate=held["format_rate"])
        run.log(row, reward=f"{row['reward/total']:.2f}", acc=f"{row['accuracy']:.2f}",
                fmt=f"{row['format_rate']:.2f}", kl=f"{row['kl']:.3f}",
                len=f"{row['completion_len_mean']:.0f}")
        if procs.main and cfg.sample_every and step % cfg.sample_every == 0:
            write_samples(run.file("samples.jsonl"), step, merged, cfg)
        # a judge that is down would turn the process reward into its fallback: stop, resumable
        down = judge and judge_down(judge, cfg.judge_max_failure_share, cfg.judge_failure_window)
        if judge and procs.any(bool(down)):  # no judge: no collective to wait at between steps
            sys.exit(f"{down or 'the judge of another process is down'}. Stopped after step "
                     f"{step}; resume from {run.save(step, loop_state())} with the same command "
                     "once the judge answers")

    run.finish(step, loop_state, "the trained adapter",  # the policy's adapter, not the reference
               lambda out: save_trained(model, processor, out, selected_adapters=["default"]))
    if procs.main:
        print(f"saved the policy adapter to {cfg.output_dir}")


if __name__ == "__main__":
    run_script(main)
