"""Accuracy of the base model or base + LoRA adapter on multiple-choice VQA test sets (Tables IV, V).

    python eval.py configs/eval.yaml adapter=runs/grpo output_dir=runs/eval-grpo
    python eval.py configs/demo_eval.yaml limit=20

Greedy decoding, batched. Every answer is appended (and flushed) to output_dir/predictions.jsonl as
it comes, so a killed run started again with the same output_dir goes on where it stopped; then
output_dir/metrics.json holds, per set, accuracy with its Wilson 95% interval, the format rate, the
unparseable count and the mean completion length. `python report.py runs/a runs/b` compares runs.

With image_controls=[blank, shuffled] each set is answered again with every image blanked (mid-grey, same
size) and with each item shown another item's image: sets[name]["controls"] holds their metrics, beside
the real images', and output_dir/controls/predictions.jsonl their answers. A model that reads the image
falls to chance there; the judge grades the real answers only.

With judge=api | self | rule (judges.py) a judge also grades *how* each answer was reasoned: six
criteria of REASONING_RUBRIC (0-1 each) and the process reward GRPO trains on, averaged per set under
sets[name]["reasoning"]; every raw reply goes to output_dir/judgements.jsonl, resumed the same way.

From another script, with a model already in memory (a training loop, the demo pipeline):
    sets = evaluate(model, processor, load_sets(["demo=data/demo/prepared/test.jsonl"]))  # no files
    metrics = run(cfg, model, processor)  # metrics.json + predictions.jsonl in cfg.output_dir
"""

import contextlib
import json
import os
import re
import sys
import time

import yaml

from checkpoint import claim_output_dir, release_output_dir
from config import EvalConfig, parse_args, save_config
from evaluation import control_name, control_sets, evaluate, load_sets, read_predictions
from inputs import InputError, check_inputs
import openqa
from mcq import Record, is_correct, option_lines, parse_answer
from model import load_model
from provenance import answer_code, weights_fingerprint
from training import Processes

# config keys that change what the model answers: predictions made under other values are not resumed
PREDICTION_KEYS = ("model", "adapter", "seed", "dtype", "quantization", "min_pixels", "max_pixels", "max_new_tokens")


def format_table(sets: dict[str, dict]) -> str:
    """One row per set; evaluation.score's reasoning checks (agrees: the reasoning leads to the answer given;
    image: it states the image's measured facts rightly, "-" without image_facts), then a column of accuracy %
    per image control that any set has ("-": skipped)."""
    controls = list(dict.fromkeys(c for m in sets.values() for c in m.get("controls", {})))
    rows = [f"{'set':<22}{'n':>6}{'acc %':>8}{'95% CI':>15}{'format':>8}{'unparse':>9}{'tokens':>8}{'items/s':>9}"
            f"{'agrees %':>10}{'image %':>9}" + "".join(f"{c + ' %':>12}" for c in controls)]
    for name, m in sets.items():
        ci = f"{100 * m['ci_low']:.1f}–{100 * m['ci_high']:.1f}"
        speed = "-" if m["items_per_s"] is None else f"{m['items_per_s']:.2f}"
        shown = [m.get("controls", {}).get(c, {}) for c in controls]
        rows.append(f"{name:<22}{m['n']:>6}{100 * m['accuracy']:>8.1f}{ci:>15}{m['format_rate']:>8.2f}"
                    f"{m['unparseable']:>9}{m['mean_completion_tokens']:>8.1f}{speed:>9}"
                    + "".join(f"{'-' if m.get(k) is None else f'{100 * m[k]:.1f}':>{w}}"
                              for k, w in (("reasoning_agrees", 10), ("image_stated_right", 9)))
                    + "".join(f"{'-':>12}" if "accuracy" not in c else f"{100 * c['accuracy']:>12.1f}" for c in shown))
    return "\n".join(rows)


def kinds_note(records: list[Record]) -> str:
    """" (closed 120, open 80)" for a set with open questions, "" for multiple choice alone."""
    opened = sum(not r.options for r in records)
    return f" (closed {len(records) - opened}, open {opened})" if opened else ""


def format_kinds_table(sets: dict[str, dict]) -> str | None:
    """Per set and kind of question, where any set has open questions (None otherwise): closed accuracy;
    open exact match, token F1 and recall (the PathVQA literature's), and judged accuracy with judge=."""
    if not any("open" in m.get("kinds", {}) for m in sets.values()):
        return None
    pct = lambda v, width: f"{'-' if v is None else f'{100 * v:.1f}':>{width}}"  # noqa: E731
    rows = [f"{'set':<22}{'closed':>8}{'acc %':>8}{'open':>7}{'exact %':>9}{'F1 %':>7}{'recall %':>10}{'judged %':>10}"]
    for name, m in sets.items():
        kinds, judged = m.get("kinds", {}), m.get("reasoning", {}).get("open_judged")
        rows.append(f"{name:<22}{kinds.get('closed', 0):>8}{pct(m.get('closed_accuracy'), 8)}{kinds.get('open', 0):>7}"
                    f"{pct(m.get('open_exact'), 9)}{pct(m.get('open_f1'), 7)}{pct(m.get('open_recall'), 10)}"
                    f"{pct(judged, 10)}")
    return "\n".join(rows)


def check_resumable(cfg, output_dir: str) -> dict:
    """Refuse to mix predictions of two different models (or decoding budgets) in one output_dir.
    -> the fingerprints of cfg's model and adapter weights, which the run saves beside its predictions."""
    fingerprints = {"model": weights_fingerprint(cfg.model), "adapter": weights_fingerprint(cfg.adapter)}
    old_config = os.path.join(output_dir, "config.yaml")
    predictions = os.path.join(output_dir, "predictions.jsonl")
    if not (os.path.isfile(old_config) and os.path.isfile(predictions) and os.path.getsize(predictions)):
        return fingerprints
    with open(old_config) as f:
        old = yaml.safe_load(f) or {}
    changed = [k for k in PREDICTION_KEYS if k in old and old[k] != getattr(cfg, k)]
    if changed:
        sys.exit(f"{output_dir} holds predictions made with other {', '.join(changed)} "
                 f"({', '.join(f'{k}={old[k]!r}' for k in changed)}): use a new output_dir")
    old_fingerprints_path = os.path.join(output_dir, "weights.json")
    if os.path.isfile(old_fingerprints_path):
        with open(old_fingerprints_path) as f:
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
        from judges import JUDGE_KINDS, judge_from_config
    except ImportError:
        sys.exit(f"judge={cfg.judge} needs judges.py, which this checkout does not have; run with judge=none")
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
# Reasoning quality: six criteria, graded by a judge of judges.py (api | self | rule)

REASONING_KEYS = ["reasoning_accuracy", "knowledge_accuracy", "rigor", "professionalism", "clarity", "conciseness"]

REASONING_RUBRIC = """You are a senior pathologist grading how a model reasoned its way to the answer of a \
multiple-choice question about a pathology image. You are given the image, the question with its lettered \
options, the model's full response (its reasoning inside <think></think>, then its choice inside \
<answer></answer>) and the correct answer.

Score each criterion between 0 (absent or wrong) and 1 (fully met):
  reasoning_accuracy: every step is correct and the steps lead to the stated answer, which is the correct \
one. A right letter reached by wrong steps, or reasoning that concludes something other than the stated \
answer, scores low; a response with no reasoning scores 0.
  knowledge_accuracy: the medical and histological facts it states (definitions, diagnostic criteria, \
markers, mechanisms) are correct and current.
  rigor: the reasoning is complete: it reads the features visible in the image, and it rules out the \
other options, saying why, before it concludes.
  professionalism: it uses precise pathology terminology, as a pathologist's report would.
  clarity: it is easy to follow, from what is seen to what is concluded, and the answer is stated plainly.
  conciseness: it says what is needed and no more: no repetition, no filler. Shorter is not better when \
a needed step is missing.

Grade the response, not the question; use the correct answer to judge accuracy only.
Reply with this JSON object and nothing else:
{"reasoning_accuracy": <number>, "knowledge_accuracy": <number>, "rigor": <number>, \
"professionalism": <number>, "clarity": <number>, "conciseness": <number>}"""

TAGS_RE = re.compile(r"</?(?:think|answer)>", re.IGNORECASE)


def reasoning_request(record: Record, completion: str):
    """The judge's view of one prediction (a judges.JudgeRequest), or None for an empty completion
    (no text once the tags are taken out), which scores 0 on every criterion unasked. A completion
    without <think> is asked: the rubric gives its missing reasoning 0, and its clarity and
    conciseness can still be graded."""
    from judges import JudgeRequest
    from mcq import THINK_RE

    if not TAGS_RE.sub("", completion).strip():
        return None
    given = ["Options:", *option_lines(record.options)] if record.options else ["(an open question: no options)"]
    correct = (f"{record.answer}) {record.answer_text()}" if record.options else
               "; ".join(openqa.references(record)))
    user = "\n".join([f"Question: {record.question.strip()}", *given,
                      "", "Model's response:", completion.strip(),
                      "", f"Correct answer: {correct}"])
    think = THINK_RE.search(completion)
    case = dict(rubric="reasoning", options=record.options, completion=completion,  # for RuleJudge
                think=think.group(1) if think else "", chosen=parse_answer(completion, record.options),
                gold=record.answer, facts=record.image_facts,
                right=None if record.options else is_correct(completion, record))
    return JudgeRequest(system=REASONING_RUBRIC, user=user, image=record.image, case=case)


def judgement_failed(line: dict) -> bool:
    """A call that got no reply (network, 5xx) is asked again on resume. An unparseable reply is
    kept: at temperature 0 the judge would write it again."""
    return ((line["reply"] is None and line["scores"] is None)
            or (line["process_reply"] is None and line["process_score"] is None)
            or (line.get("equivalence_asked", False) and line["equivalence_reply"] is None))



def judge_reasoning(judge, judge_label: str, records_by_set: dict[str, list[Record]], predictions_path: str,
                    out_path: str, chunk_size: int = 32, log=print, down=lambda final: None) -> dict[str, dict]:
    """Both rubrics over every prediction -> {set: reasoning_metrics}. One line per item is appended to
    out_path as its chunk comes back: the raw replies and what was parsed from them, or null. Items
    with a line there from the same judge_label are not asked again (the API judge's disk cache is
    shared between runs and may be off or cleared; this file belongs to the run).
    down(final) -> a message when the judge is down (judges.judge_down): asked after every chunk, and at
    the end; the run then stops with it (JudgeDown), its lines so far kept for the resume."""
    from judges import JudgeDown, parse_scores
    from rewards import PROCESS_KEYS, equivalence_request, parse_equivalence, process_request

    predictions = {(p["set"], p["id"]): p for p in read_predictions(predictions_path)}
    done = {}
    for line in read_predictions(out_path):  # same cut-line repair; a later line (a retried call) wins
        if line.get("judge") == judge_label:  # another judge's lines stay in the file, unused
            done[(line["set"], line["id"])] = line
    todo = [(name, r) for name, records in records_by_set.items() for r in records
            if (name, r.id) not in done or judgement_failed(done[(name, r.id)])]
    log(f"judge {judge_label}: {len(todo)} to judge, {sum(map(len, records_by_set.values())) - len(todo)} "
        f"already in {os.path.basename(out_path)}")
    start = time.time()
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
                line = {"id": r.id, "set": name, "judge": judge_label, "reply": None,
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
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                f.flush()
            log(f"  judged {i + len(batch)}/{len(todo)}, {time.time() - start:.1f}s")
            message = down(final=i + chunk_size >= len(todo))
            if message:
                raise JudgeDown(f"{message}. Judgements so far are in {out_path}; the failed ones are asked "
                                "again when eval.py is run again")
    return {name: reasoning_metrics([done[(name, r.id)] for r in records]) for name, records in records_by_set.items()}


def reasoning_metrics(judgements: list[dict]) -> dict:
    """Each criterion's mean over the n_judged items that have scores: judged replies, and empty
    completions at 0 (n_empty of them). The n_unparsed items whose call failed or whose reply did not
    parse are left out, not given a score; a set with none judged has means of None.
    process_score: rewards.process_reward's mean(integrity, knowledge), 0 without <think> as in
    training, over process_n_judged items; unlike training's fallback, an unparsed reply is left out."""
    scored = [j["scores"] for j in judgements if j["scores"] is not None]
    process = [j["process_score"] for j in judgements if j["process_score"] is not None]
    means = {k: sum(s[k] for s in scored) / len(scored) if scored else None for k in REASONING_KEYS}
    # open questions: right by exact match or the judge's equivalence verdict, over those with a verdict
    judged = [j["judged_correct"] for j in judgements if j.get("judged_correct") is not None]
    return {**means, "n_judged": len(scored), "n_empty": sum(j["reply"] is None and j["scores"] is not None
                                                             for j in judgements),
            "n_unparsed": len(judgements) - len(scored),
            "process_score": sum(process) / len(process) if process else None, "process_n_judged": len(process),
            "open_judged": sum(judged) / len(judged) if judged else None, "open_n_judged": len(judged)}


def format_reasoning_table(sets: dict[str, dict]) -> str:
    columns = ["reason", "knowl", "rigor", "profess", "clarity", "concise", "process"]
    rows = [f"{'set':<22}{'judged':>8}" + "".join(f"{c:>9}" for c in columns)]
    for name, m in sets.items():
        r = m["reasoning"]
        values = [r[k] for k in REASONING_KEYS] + [r["process_score"]]
        rows.append(f"{name:<22}{r['n_judged']:>8}" + "".join(f"{'-':>9}" if v is None else f"{v:>9.2f}"
                                                               for v in values))
    return "\n".join(rows)


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

    # 2. greedy answers, set by set, appended to predictions.jsonl as they come. The image controls go to
    #    controls/predictions.jsonl under their own set names ("demo[blank]") and resume the same way;
    #    predictions.jsonl keeps the real images' answers only, which the judge and report.py read.
    log = print if procs.main else lambda _: None
    with base_only:
        sets = evaluate(model, processor, records_by_set, cfg.batch_size, cfg.max_new_tokens, predictions_path,
                        log=log, procs=procs)
        control_metrics = evaluate(model, processor, controls, cfg.batch_size, cfg.max_new_tokens,
                                   os.path.join(cfg.output_dir, "controls", "predictions.jsonl"), log=log,
                                   procs=procs) if controls else {}
    for name in records_by_set:  # each control's metrics go beside the real images'
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
        from judges import judge_down

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


if __name__ == "__main__":
    try:
        main()
    except InputError as e:  # the model name (model.check_model) or the judge's key refused mid-run (judges.py)
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # every answer so far is in predictions.jsonl, flushed as it came
        sys.exit("\nstopped: the answers so far are saved in predictions.jsonl; run the same command again to "
                 "answer the rest")
