"""Accuracy of the base model or base + LoRA adapter on multiple-choice VQA test sets (Tables IV, V).

    python eval.py configs/eval.yaml adapter=runs/grpo output_dir=runs/eval-grpo
    python eval.py configs/demo_eval.yaml limit=20

Greedy decoding, batched. Every answer is appended (and flushed) to output_dir/predictions.jsonl as
it comes, so a killed run started again with the same output_dir goes on where it stopped; then
output_dir/metrics.json holds, per set, accuracy with its Wilson 95% interval, the format rate, the
unparseable count and the mean completion length. `python tools/report.py runs/a runs/b` compares runs.

With image_controls=[blank, shuffled] each set is answered again with every image blanked (mid-grey, same
size) and with each item shown another item's image: sets[name]["controls"] holds their metrics, beside
the real images', and output_dir/controls/predictions.jsonl their answers. A model that reads the image
falls to chance there; the judge grades the real answers only.

With judge=api | self | rule (pathvlm/judges.py) a judge also grades *how* each answer was reasoned: six
criteria of reasoning.REASONING_RUBRIC (0-1 each) and the process reward GRPO trains on, averaged per set under
sets[name]["reasoning"]; every raw reply goes to output_dir/judgements.jsonl, resumed the same way.

From another script, with a model already in memory (a training loop, the demo pipeline):
    sets = evaluate(model, processor, load_sets(["demo=data/demo/prepared/test.jsonl"]))  # no files
    metrics = run(cfg, model, processor)  # metrics.json + predictions.jsonl in cfg.output_dir
"""

import contextlib
import json
import os
import sys
import time

import yaml

from pathvlm.checkpoint import claim_output_dir, release_output_dir
from pathvlm.config import EvalConfig, parse_args, save_config
from pathvlm.controls import control_name, control_sets
from pathvlm.errors import reading, run_script, writing
from pathvlm.evaluation import (evaluate, format_kinds_table, format_table, kinds_note, load_sets, read_predictions,
                                verdict_key)
from pathvlm.inputs import check_inputs
from pathvlm.model import load_model
from pathvlm.provenance import answer_code, weights_fingerprint
from pathvlm.reasoning import REASONING_KEYS, format_reasoning_table, reasoning_metrics, reasoning_request
from pathvlm.records import Record
from pathvlm.sampler import sampler_settings
from pathvlm.training import Processes, split_by_length

# config keys that change what the model answers: predictions made under other values are not resumed
PREDICTION_KEYS = ("model", "adapter", "seed", "dtype", "quantization", "min_pixels", "max_pixels", "max_new_tokens")


def check_resumable(cfg, output_dir: str) -> dict:
    """Refuse to mix predictions of two different models (or decoding budgets) in one output_dir.
    -> the fingerprints of cfg's model and adapter weights, which the run saves beside its predictions."""
    fingerprints = {"model": weights_fingerprint(cfg.model), "adapter": weights_fingerprint(cfg.adapter)}
    old_config = os.path.join(output_dir, "config.yaml")
    predictions = os.path.join(output_dir, "predictions.jsonl")
    if not (os.path.isfile(old_config) and os.path.isfile(predictions) and os.path.getsize(predictions)):
        return fingerprints
    fix = "move the folder away (or delete it) to evaluate afresh"
    with reading(old_config, "the earlier evaluation's config", fix):
        with open(old_config) as f:
            old = yaml.safe_load(f) or {}
    changed = [k for k in PREDICTION_KEYS if k in old and old[k] != getattr(cfg, k)]
    if changed:
        sys.exit(f"{output_dir} holds predictions made with other {', '.join(changed)} "
                 f"({', '.join(f'{k}={old[k]!r}' for k in changed)}): use a new output_dir")
    old_fingerprints_path = os.path.join(output_dir, "weights.json")
    if os.path.isfile(old_fingerprints_path):
        with reading(old_fingerprints_path, "the earlier evaluation's weights fingerprint", fix), \
                open(old_fingerprints_path) as f:
            old_fingerprints = json.load(f)
        retrained = [k for k in fingerprints if old_fingerprints.get(k) != fingerprints[k]]
        if retrained:
            where = " and ".join(f"{k} {getattr(cfg, k)}" for k in retrained)
            sys.exit(f"{output_dir} holds predictions of other weights than those now in {where} (trained again "
                     "since?): use a new output_dir, or delete this one to evaluate the new weights")
    return fingerprints


def trained_quantization(adapter: str | None) -> str | None:
    """The base quantization an adapter was trained on, from the config.yaml its training run saved
    beside it (train_sft.py / train_grpo.py write both to output_dir), or None if unknown."""
    path = os.path.join(adapter or "", "config.yaml")
    if adapter is None or not os.path.isfile(path):
        return None
    with open(path) as f:
        return (yaml.safe_load(f) or {}).get("quantization")


def make_eval_judge(cfg, model=None, processor=None):
    """The reasoning-quality judge of judges.py, or None when judge=none. Called first without a
    model, so a missing judges.py, an unknown kind or an unset API key stops the run before it
    starts; judge=self needs the model and is made on the second call."""
    if cfg.judge == "none":
        return None
    try:
        from pathvlm.judges import JUDGE_KINDS, judge_from_config
    except ImportError:
        sys.exit(f"judge={cfg.judge} needs pathvlm/judges.py, which this checkout does not have; run with judge=none")
    if cfg.judge not in JUDGE_KINDS:
        sys.exit(f"unknown judge '{cfg.judge}': use one of {', '.join(JUDGE_KINDS)} or none")
    if cfg.judge == "self":
        # the six-key JSON reply is ~60 Qwen tokens: the self-judge's default 64 would cut it
        return None if model is None else judge_from_config(cfg, model, processor, max_new_tokens=128,
                                                            batch_size=cfg.batch_size)
    try:
        return judge_from_config(cfg)
    except (ImportError, ValueError) as e:  # judge=api: no openai package, no key in the environment
        sys.exit(f"judge={cfg.judge}: {e}")


# ----------------------------------------------------------------------------------------------
# Reasoning quality: six criteria (pathvlm/reasoning.py) and the process reward, graded by a judge of
# judges.py (api | self | rule)

def judgement_failed(line: dict) -> bool:
    """A call that got no reply (network, 5xx) is asked again on resume. An unparseable reply is
    kept: at temperature 0 the judge would write it again."""
    return ((line["reply"] is None and line["scores"] is None)
            or (line["process_reply"] is None and line["process_score"] is None)
            or (line.get("equivalence_asked", False) and line["equivalence_reply"] is None))


def judge_reasoning(judge, judge_label: str, records_by_set: dict[str, list[Record]], predictions_path: str,
                    out_path: str, log=print, down=lambda final: None) -> dict[str, dict]:
    """Both rubrics over every prediction -> {set: reasoning_metrics}. One line per item is appended to
    out_path as its chunk comes back: the raw replies and what was parsed from them, or null. A chunk is as
    many items as the judge answers at once (its concurrency or batch), so a stop loses at most those. Items
    with a line there from the same judge_label are not asked again (the API judge's disk cache is
    shared between runs and may be off or cleared; this file belongs to the run).
    down(final) -> a message when the judge is down (verdicts.judge_down): asked after every chunk, and at
    the end; the run then stops with it (JudgeDown), its lines so far kept for the resume."""
    from pathvlm.verdicts import JudgeDown, parse_scores
    from rewards import PROCESS_KEYS, equivalence_request, parse_equivalence, process_request

    with reading(out_path, "the judgements", "fix or delete that line (its item is judged again)"):
        stored = read_predictions(out_path)
    predictions = {(p["set"], p["id"]): p for p in read_predictions(predictions_path)}
    # a stored verdict counts only for the record and answer it was given on: a corrected answer key, another
    # image or a new answer is judged again (evaluation.verdict_key)
    keys = {(name, r.id): verdict_key(r, predictions[(name, r.id)]["completion"])
            for name, records in records_by_set.items() for r in records}
    done = {}
    for line in stored:  # read_predictions' cut-line repair; a later line (a retried call) wins
        key = (line.get("set"), line.get("id"))
        if line.get("judge") == judge_label and line.get("for") == keys.get(key):  # else unused, left in the file
            done[key] = line
    todo = [(name, r) for name, records in records_by_set.items() for r in records
            if (name, r.id) not in done or judgement_failed(done[(name, r.id)])]
    log(f"judge {judge_label}: {len(todo)} to judge, {sum(map(len, records_by_set.values())) - len(todo)} "
        f"already in {os.path.basename(out_path)}")
    start = time.time()
    chunk_size = getattr(judge, "max_concurrency", None) or getattr(judge, "batch_size", None) or 8
    with open(out_path, "a") as f:
        for i in range(0, len(todo), chunk_size):
            batch = todo[i:i + chunk_size]
            asks = []  # (reasoning, process, equivalence) requests per item; None: not asked
            for name, r in batch:
                completion = predictions[(name, r.id)]["completion"]
                asks.append((reasoning_request(r, completion), process_request(r, completion, r.image),
                             equivalence_request(r, completion, r.image)))
            requests = [q for ask in asks for q in ask if q is not None]
            replies = iter(judge.complete(requests) if requests else [])  # in the order of `requests`
            for (name, r), (reasoning_q, process_q, equivalence_q) in zip(batch, asks):
                line = {"id": r.id, "set": name, "judge": judge_label, "for": keys[(name, r.id)], "reply": None,
                        "scores": dict.fromkeys(REASONING_KEYS, 0.0), "process_reply": None, "process_score": 0.0}
                if not r.options:  # open: right by exact match, else by the judge's verdict (None: unreadable)
                    line.update(equivalence_asked=equivalence_q is not None, equivalence_reply=None,
                                judged_correct=bool(predictions[(name, r.id)]["correct"]))
                if reasoning_q is not None:
                    line["reply"] = next(replies)
                    line["scores"] = parse_scores(line["reply"], REASONING_KEYS)
                if process_q is not None:  # rewards.process_request: None without a <think> block
                    line["process_reply"] = next(replies)
                    scores = parse_scores(line["process_reply"], PROCESS_KEYS)
                    line["process_score"] = None if scores is None else sum(scores.values()) / len(scores)
                if equivalence_q is not None:
                    line["equivalence_reply"] = next(replies)
                    line["judged_correct"] = parse_equivalence(line["equivalence_reply"])
                failed = [q is not None and parsed is None for q, parsed in
                          [(reasoning_q, line["scores"]), (process_q, line["process_score"]),
                           (equivalence_q, line.get("judged_correct"))]]
                judge.stats.add(fallbacks=sum(failed), no_think=int(process_q is None))
                judge.stats.verdicts([not f for f, q in zip(failed, (reasoning_q, process_q, equivalence_q))
                                      if q is not None])
                done[(name, r.id)] = line
                with writing(out_path):
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
                    f.flush()
            if (i // chunk_size) % 10 == 9 or i + chunk_size >= len(todo):
                log(f"  judged {i + len(batch)}/{len(todo)}, {time.time() - start:.1f}s")
            message = down(final=i + chunk_size >= len(todo))
            if message:
                raise JudgeDown(f"{message}. Judgements so far are in {out_path}; the failed ones are asked "
                                "again when eval.py is run again")
    return {name: reasoning_metrics([done[(name, r.id)] for r in records]) for name, records in records_by_set.items()}


def run(cfg: EvalConfig, model=None, processor=None) -> dict:
    """The whole evaluation of the docstring at the top -> the metrics written to metrics.json.
    Pass model and processor to evaluate a model already in memory (cfg.adapter is then a label).
    Under torchrun / accelerate launch, each process answers its share of the items; the main process
    writes predictions.jsonl in the one-process order, judges, and writes metrics.json."""
    procs = Processes(cfg.collective_timeout)
    predictions_path = os.path.join(cfg.output_dir, "predictions.jsonl")
    judge = make_eval_judge(cfg)  # judge=self: None until the model is loaded
    try:
        if model is None:  # before loading one; with a model in memory, cfg.adapter is only a label
            check_inputs(cfg)
        fingerprints = check_resumable(cfg, cfg.output_dir)
        full_sets = load_sets(cfg.sets)  # whole: a shuffled item sees the same image under any limit
        records_by_set = {name: records[:cfg.limit] if cfg.limit > 0 else records
                          for name, records in full_sets.items()}
        controls, skipped = control_sets(full_sets, cfg.image_controls, cfg.seed,
                                         os.path.join(cfg.output_dir, "controls"), cfg.limit)  # blank PNGs there
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if procs.main:
        claim_output_dir(cfg.output_dir)  # one evaluation per output_dir: two would append to one predictions.jsonl
        save_config(cfg, cfg.output_dir)
        with open(os.path.join(cfg.output_dir, "weights.json"), "w") as f:
            json.dump(fingerprints, f)
        print(f"model {cfg.model}, adapter {cfg.adapter or 'none (base model)'}; "
              + ", ".join(f"{name} {len(r)}" + kinds_note(r) for name, r in records_by_set.items())
              + (f"; image controls {', '.join(cfg.image_controls)}" if cfg.image_controls else ""))
        for name, why in skipped.items():
            print(f"note: {name} skipped: {why}")
    trained_on = trained_quantization(cfg.adapter)
    if trained_on not in (None, cfg.quantization) and procs.main:
        # a QLoRA adapter learnt to correct the 4-bit weights' rounding too: on another base it is not
        # quite the model that was trained (usually close, sometimes a point or two of accuracy apart)
        print(f"note: {cfg.adapter} was trained on a quantization={trained_on} base; this evaluation uses "
              f"quantization={cfg.quantization} (add quantization={trained_on} to evaluate it as trained)")

    # 1. model and processor, once. Without an adapter load_model still attaches a fresh LoRA (B = 0,
    #    the identity); switching it off gives the base model's answers without its extra matmuls.
    base_only = contextlib.nullcontext()
    if model is None:
        model, processor = load_model(cfg, adapter=cfg.adapter, trainable=False)
        base_only = model.disable_adapter() if cfg.adapter is None else base_only

    # 1b. items whose prompt is over max_prompt_len tokens: skipped and counted, in the set and its controls
    too_long = {}
    for name, records in records_by_set.items():
        records_by_set[name], dropped = split_by_length(records, processor, cfg.max_prompt_len, with_target=False)
        too_long[name] = {r.id for r in dropped}
        if dropped and procs.main:
            print(f"note: {name}: {len(dropped)} item(s) skipped, their prompt over max_prompt_len="
                  f"{cfg.max_prompt_len} tokens: {', '.join(sorted(too_long[name])[:5])}")
    for name in records_by_set:  # each control of a set shows the same items
        for key in (control_name(name, c) for c in cfg.image_controls if control_name(name, c) in controls):
            controls[key] = [r for r in controls[key] if r.id not in too_long[name]]

    # 2. greedy answers, set by set, appended to predictions.jsonl as they come. The image controls go to
    #    controls/predictions.jsonl under their own set names ("demo[blank]") and resume the same way;
    #    predictions.jsonl keeps the real images' answers only, which the judge and tools/report.py read.
    log = print if procs.main else lambda _: None
    sampling = sampler_settings(cfg, next(model.parameters()).device)  # greedy: sampler.greedy
    with base_only:
        sets = evaluate(model, processor, records_by_set, cfg.batch_size, cfg.max_new_tokens, predictions_path,
                        log=log, procs=procs, **sampling)
        control_metrics = evaluate(model, processor, controls, cfg.batch_size, cfg.max_new_tokens,
                                   os.path.join(cfg.output_dir, "controls", "predictions.jsonl"), log=log,
                                   procs=procs, **sampling) if controls else {}
    for name in records_by_set:  # each control's metrics go beside the real images'
        sets[name]["skipped_too_long"] = len(too_long[name])
        for control in cfg.image_controls:
            key = control_name(name, control)
            m = control_metrics[key] if key in control_metrics else {"skipped": skipped[key]}
            sets[name].setdefault("controls", {})[control] = m
    metrics = {"run": cfg.run_name or os.path.basename(os.path.normpath(cfg.output_dir)), "model": cfg.model,
               "adapter": cfg.adapter, "accuracy": next(iter(sets.values()))["accuracy"], "sets": sets,
               # the prompt's and the answer parser's fingerprints: runs compared in one table must share them
               "answer_code": answer_code()}

    # 3. reasoning quality (judge=api | self | rule). Accuracy is the paper's table; this grades *how*
    #    the model reasons: REASONING_RUBRIC's six criteria, and rewards.py's process rubric, which GRPO
    #    trains on (so a rise there alone may be the policy learning its reward, not better reasoning).
    if not procs.main:  # the rest is the main process's: judging, metrics.json, the table
        return metrics
    judge = make_eval_judge(cfg, model, processor) if cfg.judge == "self" else judge
    if judge is not None:
        from pathvlm.verdicts import judge_down

        api = {"model": cfg.judge_model, "base_url": cfg.judge_base_url} if cfg.judge == "api" else {}
        label = f"api:{cfg.judge_model}" if api else cfg.judge  # judgements of another judge are not resumed
        reasoning = judge_reasoning(judge, label, records_by_set, predictions_path,
                                    os.path.join(cfg.output_dir, "judgements.jsonl"),
                                    down=lambda final: judge_down(judge, cfg.judge_max_failure_share,
                                                                  cfg.judge_failure_window, final))
        for name, r in reasoning.items():
            sets[name]["reasoning"] = r
        metrics["judge"] = {"kind": cfg.judge, **api, **judge.stats.as_dict()}  # this call's counters; no key

    # 4. metrics.json (written whole, then renamed: a kill never leaves half a file) and the table
    tmp = os.path.join(cfg.output_dir, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, os.path.join(cfg.output_dir, "metrics.json"))
    print(format_table(sets))
    kinds = format_kinds_table(sets)
    if kinds:
        print(kinds)
    if judge is not None:
        print(format_reasoning_table(sets))
    print(f"wrote {cfg.output_dir}/metrics.json, predictions.jsonl" + (" and judgements.jsonl" if judge else ""))
    release_output_dir(cfg.output_dir)
    return metrics


def main(argv=None):
    return run(parse_args(EvalConfig, argv))


if __name__ == "__main__":  # answers and judgements are kept as they come (predictions.jsonl, judgements.jsonl)
    run_script(main, interrupted="\nstopped: the answers and judgements so far are kept in output_dir; run the same "
               "command again to go on from them")
