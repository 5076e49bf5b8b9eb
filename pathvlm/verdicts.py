"""A judge's requests and verdicts: what is asked (JudgeRequest), how a reply is read (parse_scores), and what
is counted (JudgeStats, judge_down). The clients that answer are in judges.py; the rule judge (rule_judge.py)
replies through the same parser. No model here, and no project import but the errors.
"""

import json
import math
import sys
import threading
from collections import deque
from dataclasses import dataclass, field, fields

from pathvlm.errors import InputError


@dataclass(frozen=True)
class JudgeRequest:
    system: str  # the rubric
    user: str  # the case to grade
    image: str | None = None  # path of the image the judge should look at
    # Structured fields for judges that do not read text (RuleJudge): question, options, think,
    # chosen (letter or None), gold (letter). Never sent to an API, not part of the cache key.
    case: dict | None = None


@dataclass
class JudgeStats:
    """Cumulative counters; a training loop logs `as_dict()` (or differences of it) every step."""

    calls: int = 0  # requests sent to the API (retries included) or generations run
    cache_hits: int = 0  # requests answered from the disk cache or by an identical request in the batch
    retries: int = 0
    failures: int = 0  # requests that got no reply (None)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Kept by the rubric code that reads this judge's replies:
    fallbacks: int = 0  # replies that failed or were no verdict (parse_scores: None), scored by the fallback rule
    no_think: int = 0  # completions without a <think> block, scored 0 without asking the judge
    last_error: str = ""  # why the latest request or verdict failed (never holds the API key)
    # usable (True) or failed (False), for each of the latest verdicts asked: judge_down reads it
    recent: deque = field(default_factory=lambda: deque(maxlen=4096), repr=False, compare=False)
    _reported: int = field(default=0, repr=False, compare=False)  # failures passed to fail(): the first are printed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    PRINTED_FAILURES = 3  # the first failures go to stderr as they happen; the rest are counted

    def add(self, **counts: int):
        with self._lock:  # APIJudge's worker threads count concurrently
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def fail(self, why: str, counter: str = "failures"):
        """Count a failed request (or, counter="fallbacks", a reply that was no verdict) and say why; the
        first few are printed at once, so a judge that is down is seen in the first step, not in a log."""
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)
            self.last_error = why
            self._reported += 1
            reported = self._reported
        if reported <= self.PRINTED_FAILURES:
            print(f"judge: {why}" + ("" if reported < self.PRINTED_FAILURES else
                                     " (further judge failures are counted in judge/failures, judge/fallbacks)"),
                  file=sys.stderr, flush=True)

    def verdicts(self, usable: list[bool]):
        with self._lock:
            self.recent.extend(usable)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not f.name.startswith("_") and isinstance(getattr(self, f.name), int)}


class JudgeDown(InputError, RuntimeError):
    """Too many of the judge's recent verdicts failed: the scripts stop (GRPO with a checkpoint) with this message."""


def judge_down(judge, max_failure_share: float, window: int, final: bool = False) -> str | None:
    """Why the run should stop, or None: more than max_failure_share of the last `window` verdicts failed.
    Judged once `window` verdicts have been asked, or at the end of a run (final=True) on what there is:
    a dead judge then stops an eval of five items too, instead of reporting "judged 0" and exiting 0."""
    recent = list(judge.stats.recent)[-window:]
    if not recent or (len(recent) < window and not final):
        return None
    failed = recent.count(False)
    if failed / len(recent) <= max_failure_share:
        return None
    return (f"{judge.name}: {failed} of the last {len(recent)} verdicts failed (more than judge_max_failure_share="
            f"{max_failure_share}); last error: {judge.stats.last_error or 'none recorded'}. The process reward "
            "would have become its fallback. Check the judge (URL, model, server), or raise judge_max_failure_share")


# ----------------------------------------------------------------------------------------------
# Replies: the verdict is the reply's last JSON object

MAX_REPLY_CHARS = 20_000  # a verdict is ~60 characters; a longer reply is read from its end


def last_json_object(text: str) -> dict | None:
    """The last top-level JSON object in `text` (objects nested in it are part of it), or None."""
    decoder, found, i = json.JSONDecoder(), None, 0
    while (i := text.find("{", i)) != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        if isinstance(obj, dict):
            found = obj
        i = end
    return found


def parse_scores(reply: str | None, keys: list[str]) -> dict[str, float] | None:
    """{key: score} from the reply's last JSON object, or None (the caller's counted fallback).
    Only that object is read: a judge that quotes the student's text, forged scores and all, before its
    verdict is scored by its verdict. Every key must hold a number in [0, 1]: 7 (a 0-10 scale), "80%" or
    "3/5" is a judge that misread the rubric, and is counted as a failure rather than clamped to 1.0."""
    if not isinstance(reply, str):
        return None
    obj = last_json_object(reply[-MAX_REPLY_CHARS:])
    if obj is None:
        return None
    scores = {k: _as_score(obj.get(k)) for k in keys}
    return scores if None not in scores.values() else None


def _as_score(value) -> float | None:
    if isinstance(value, bool):  # json `true` is an int in Python, and no score
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and 0.0 <= x <= 1.0 else None
