"""Greedy answers to test sets (multiple-choice and open questions, mixed or not) and their metrics: what
eval.py reports, and what train_grpo.py's held-out curve measures; the image-reliance controls (blank and
shuffled images); reading runs' JSONL files; each accuracy's Wilson interval. McNemar's test on paired
answers is tools/stats.py's.
Nothing here imports torch until a model is asked for answers.
"""

import dataclasses
import hashlib
import json
import os
import time

from pathvlm import openqa
from pathvlm.answers import THINK_RE, canonical, is_well_formed, parse_answer, parse_open_answer
from pathvlm.errors import reading, writing
from pathvlm.images import file_sha256, open_image
from pathvlm.records import KINDS, LETTERS, Record, image_path, load_split, prompt_messages


def load_sets(specs: list[str], limit: int = 0) -> dict[str, list[Record]]:
    """["name=path.jsonl", ...] -> {name: records}, the first `limit` of each if limit > 0. Image
    paths become absolute and are checked here, not hours into the run."""
    if not specs:
        raise ValueError("no test sets: give sets=[name=path.jsonl, ...]")
    sets = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"test set must be given as name=path.jsonl, got '{spec}'")
        if name.strip() in sets:
            raise ValueError(f"test set '{name.strip()}' is given twice")
        records = load_split(path.strip())  # its errors name the file (and line)
        records = records[:limit] if limit > 0 else records
        for r in records:
            r.image = image_path(path.strip(), r)
            if not os.path.isfile(r.image):
                raise FileNotFoundError(f"{path.strip()}: image of '{r.id}' not found: {r.image}")
        sets[name.strip()] = records
    return sets


# ----------------------------------------------------------------------------------------------
# Image-reliance controls: the same questions with an image that carries no answer. A model that
# reads the image falls to chance; one that answers from the text alone (option order, priors) does not.

def score(completion: str, record: Record) -> dict:
    """An empty or unparseable completion is a wrong answer (parsed None), never an error.
    closed: parsed is the chosen letter. open: parsed is the answer's text; correct is an exact match after
    openqa.normalise, f1 and recall are token F1 and recall against the best reference (openqa.py).
    The completion is read in answers.canonical form, as the rewards read it in training."""
    completion = canonical(completion)
    if record.options:
        parsed = parse_answer(completion, record.options)
        return {"kind": "closed", "parsed": parsed, "correct": parsed is not None and parsed == record.answer}
    parsed, refs = parse_open_answer(completion), openqa.references(record)
    return {"kind": "open", "parsed": parsed, "correct": openqa.exact_match(parsed, refs),
            "f1": openqa.token_f1(parsed, refs), "recall": openqa.token_recall(parsed, refs)}


def option_texts(parsed: str | None, record: Record) -> dict:
    """The gold and the given answer as text (parsed: score's): letters are shuffled per item, texts are what
    a confusion matrix compares (tools/report.py); an open question's in normalised form (openqa.normalise), so
    "Granulomas." and "granuloma" are one answer. parsed_text is None when nothing parsed."""
    if not record.options:
        return {"gold_text": openqa.normalise(record.answer),
                "parsed_text": None if parsed is None else openqa.normalise(parsed)}
    return {"gold_text": record.answer_text(),
            "parsed_text": None if parsed is None else record.options[LETTERS.index(parsed)]}


def confusion(predictions: list[dict]) -> dict[tuple[str, str], int]:
    """{(gold option text, predicted option text or "unparsed"): count} over predictions that carry
    option_texts (eval.py writes them; older predictions files do not and are left out)."""
    counts: dict[tuple[str, str], int] = {}
    for p in predictions:
        if "gold_text" in p:
            key = (p["gold_text"], p["parsed_text"] or "unparsed")
            counts[key] = counts.get(key, 0) + 1
    return counts


def read_predictions(path: str) -> list[dict]:
    """Predictions written so far. A last line cut by a kill is first cut from the file, so that item
    is generated again and the next append starts on a line of its own."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
    return read_jsonl(path)


def prompt_key(record: Record) -> str:
    """What the model is shown for a record, hashed: question, options and the image's bytes. A stored answer
    is kept only while this is unchanged; the answer key is not in it, so a corrected gold letter rescores the
    stored answers instead of asking the model again."""
    return _shown_key(record.question, record.options, file_sha256(record.image))


def verdict_key(record: Record, completion: str) -> str:
    """What a judge is shown of an answer, hashed: the whole record (its answer key, reference and image facts
    too), the image's bytes and the completion. A stored verdict is reused only while this is unchanged."""
    return _shown_key(dataclasses.asdict(record), file_sha256(record.image), completion)


def _shown_key(*shown) -> str:
    return hashlib.sha256(json.dumps(shown, ensure_ascii=False).encode()).hexdigest()[:16]


def resumed_predictions(path: str, records_by_set: dict[str, list[Record]], write: bool, log=print) -> dict:
    """The predictions already in `path` for these records, each rescored against its record as it is now
    (the answer key may have been corrected since) and dropped where what the model was shown has changed
    (prompt_key), so it is answered again. The file is rewritten with them, whole and then renamed (a kill
    leaves the old file or the new one), where `write`; lines of other records stay. -> {(set, id): prediction}"""
    with reading(path, "the predictions", "fix or delete that line (its item is answered again)"):
        stored = {(p["set"], p["id"]): p for p in read_predictions(path)}
    kept, changed = {}, 0
    for name, records in records_by_set.items():
        stale = rescored = 0
        for r in records:
            p = stored.pop((name, r.id), None)
            if p is None:
                continue
            if p.get("prompt") != prompt_key(r):
                stale += 1
                continue
            scored = score(p["completion"], r)
            now = {**p, **scored, "gold": r.answer, **option_texts(scored["parsed"], r)}
            rescored += now["correct"] != p["correct"]
            kept[(name, r.id)] = now
        changed += stale + rescored
        if stale or rescored:
            log(f"  {name}: {rescored} earlier answers rescored against the records as they are now, {stale} "
                "answered again (their question, options or image changed)")
    if write and changed:
        with open(path + ".tmp", "w") as f:
            for p in [*stored.values(), *kept.values()]:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
    return kept


def set_metrics(predictions: list[dict], records: list[Record] | None = None) -> dict:
    """A set's metrics from its predictions; with the records (in the same order), also the shares of
    reasoning_checks over them, computed from the saved completions (so a resumed evaluation has them too)."""
    n = len(predictions)
    correct = sum(bool(p["correct"]) for p in predictions)
    ci_low, ci_high = wilson_interval(correct, n)
    metrics = {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "ci_low": ci_low,
               "ci_high": ci_high,
               "format_rate": sum(is_well_formed(canonical(p["completion"])) for p in predictions) / n if n else 0.0,
               "unparseable": sum(p["parsed"] is None for p in predictions),
               "mean_completion_tokens": sum(p["completion_tokens"] for p in predictions) / n if n else 0.0}
    metrics.update(kind_metrics(predictions))
    if records is not None:
        checks = [reasoning_checks(p["completion"], p["parsed"], r) for p, r in zip(predictions, records)]
        for key in ("reasoning_agrees", "image_stated_right"):
            known = [c[key] for c in checks if c[key] is not None]
            metrics[key] = sum(known) / len(known) if known else None  # None: no record says what its image shows
    return metrics


def kind_metrics(predictions: list[dict]) -> dict:
    """Per kind of question (predictions from before open questions have no "kind": closed):
    kinds {closed: n, open: n}; closed_accuracy; open_exact, open_f1 and open_recall (means over the open
    items: the PathVQA literature's open-question metrics). A kind the set lacks has no keys."""
    by_kind = {k: [p for p in predictions if p.get("kind", "closed") == k] for k in KINDS}
    out = {"kinds": {k: len(v) for k, v in by_kind.items() if v}}
    if by_kind["closed"]:
        out["closed_accuracy"] = sum(bool(p["correct"]) for p in by_kind["closed"]) / len(by_kind["closed"])
    if by_kind["open"]:
        n = len(by_kind["open"])
        out.update(open_exact=sum(bool(p["correct"]) for p in by_kind["open"]) / n,
                   open_f1=sum(p["f1"] for p in by_kind["open"]) / n,
                   open_recall=sum(p["recall"] for p in by_kind["open"]) / n)
    return out


def reasoning_checks(completion: str, parsed: str | None, record: Record) -> dict:
    """Two checks of the reasoning by rule_judge's rules (no judge needed): whether it leads to the answer
    given (parsed: score's letter; reasoning_agrees: False without reasoning, None on an open question), and,
    where the record says what its image measures (image_facts; else None), whether what it says about the
    image is right (image_stated_right)."""
    from pathvlm.rule_judge import agrees_with_answer, image_stated_correctly

    think = THINK_RE.search(completion)
    think = think.group(1) if think and think.group(1).strip() else ""
    # an open question has no options for the reasoning to agree with: not checked (None)
    return {"reasoning_agrees": None if not record.options else bool(think) and agrees_with_answer(
                record.options, think, parsed),
            "image_stated_right": (None if not record.image_facts else
                                   image_stated_correctly(think, record.image_facts, record.options) is True)}


def evaluate(model, processor, records_by_set: dict[str, list[Record]], batch_size: int = 8,
             max_new_tokens: int = 256, predictions_path: str | None = None, log=print,
             procs=None, sampler: str = "static", cuda_graph: bool = False) -> dict[str, dict]:
    """Greedy answers to every record -> {set name: metrics}; each set's "generated" counts the items
    answered in this call. Record images must be openable paths (load_sets makes them absolute).
    With predictions_path, each prediction is appended there as it comes and (set, id) pairs
    already there are not generated again; the metrics cover all of `records_by_set`.
    Several processes (procs): each answers its share of every round of batch_size x N items; the
    main process writes the round's predictions in the order one process would have.
    sampler, cuda_graph: sampler.greedy's."""
    from pathvlm.generation import encode_prompts
    from pathvlm.sampler import greedy
    from pathvlm.training import Processes

    procs = procs or Processes()
    done = resumed_predictions(predictions_path, records_by_set, procs.main, log) if predictions_path else {}
    if predictions_path and procs.main:
        os.makedirs(os.path.dirname(os.path.abspath(predictions_path)), exist_ok=True)
    out = open(predictions_path, "a") if predictions_path and procs.main else None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results = {}
    try:
        for name, records in records_by_set.items():
            todo = [r for r in records if (name, r.id) not in done]
            start = time.time()
            step = batch_size * procs.world_size  # items per round, all processes together
            for i in range(0, len(todo), step):
                batch = todo[i:i + step][procs.rank::procs.world_size]  # this process's share of the round
                preds = []
                if batch:
                    images = [open_image(r.image) for r in batch]
                    inputs = encode_prompts(processor, [prompt_messages(r) for r in batch], images, device)
                    answers, texts = greedy(model, processor, inputs, max_new_tokens, sampler, cuda_graph)
                    lengths = answers.mask.sum(1).tolist()  # tokens up to and including EOS
                    scores = [score(text, record) for record, text in zip(batch, texts)]
                    preds = [{"id": record.id, "set": name, "completion": text, **scored, "gold": record.answer,
                              "completion_tokens": length, **option_texts(scored["parsed"], record),
                              "prompt": prompt_key(record)}  # what it answered: resumed_predictions checks it
                             for record, text, length, scored in zip(batch, texts, lengths, scores)]
                shares = procs.gather(preds)
                for k in range(len(todo[i:i + step])):  # back in the order of todo
                    pred = shares[k % procs.world_size][k // procs.world_size]
                    done[(name, pred["id"])] = pred
                    if out:
                        with writing(predictions_path):
                            out.write(json.dumps(pred, ensure_ascii=False) + "\n")
                            out.flush()
                if (i // step) % 10 == 0 or i + step >= len(todo):
                    log(f"  {name}: {min(i + step, len(todo))}/{len(todo)} generated, {time.time() - start:.1f}s")
            seconds = time.time() - start
            results[name] = set_metrics([done[(name, r.id)] for r in records], records)
            results[name]["items_per_s"] = round(len(todo) / seconds, 3) if todo else None
            results[name]["generated"] = len(todo)
    finally:
        if out:
            with writing(predictions_path):  # closing flushes what a failed write left in the buffer: fails too
                out.close()
        model.train(was_training)
    return results


def wilson_interval(correct: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (scipy's binomtest): unlike p ± z·sqrt(p(1-p)/n) it stays
    inside [0, 1] and is not zero-width at 0/n or n/n. n = 0 -> (0, 1): nothing is known."""
    if n == 0:
        return 0.0, 1.0
    import scipy.stats  # here, not at the top: it takes ~1 s to import, and train_grpo.py and eval.py import this

    ci = scipy.stats.binomtest(correct, n).proportion_ci(confidence_level=level, method="wilson")
    # at 0/n and n/n the bound is exactly 0 or 1; floating point would give 1e-17 or 0.9999999999999999
    return (0.0 if correct == 0 else float(ci.low)), (1.0 if correct == n else float(ci.high))


def read_jsonl(path: str) -> list[dict]:
    """One JSON object per line. A last line that does not parse was cut by a killed writer and is
    ignored; a bad line anywhere else is an error naming the file and line."""
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # no newline after it: cut mid-write
                continue
            raise ValueError(f"{path}:{n}: not valid JSON") from None
    return rows


# ----------------------------------------------------------------------------------------------
# The tables eval.py prints

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
