"""A judge's requests and verdicts: what is asked (JudgeRequest), how a reply is read (parse_scores, a strict
protocol), and what is counted (JudgeStats, judge_down). The clients that answer are in judges.py; the rule
judge (rule_judge.py) replies through the same parser. No model here, and no project import but the errors.
"""

import json
import math
import re
import sys
import threading
from collections import deque
from dataclasses import dataclass, field, fields

from pathvlm.errors import InputError
from pathvlm.records import LOOK_ALIKES  # mapped for the key check only: "іntegrity_score" with a Cyrillic і


@dataclass(frozen=True)
class JudgeRequest:
    system: str  # the rubric
    user: str  # the case to grade
    image: str | None = None  # path of the image the judge should look at
    # Structured fields for judges that do not read text (RuleJudge): question, options, think,
    # chosen (letter or None), gold (letter). Never sent to an API, not part of the cache key.
    case: dict | None = None
    keys: tuple[str, ...] = ()  # the verdict's keys: an API judge is asked for exactly this object (verdict_schema)


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
    no_answer: int = 0  # completions committing to no answer (a hedge, no option): scored 0 without asking
    to_grader: int = 0  # completions that write the verdict's keys or a verdict-shaped object: 0, judge not asked
    schema_refused: int = 0  # 1 once the API server refused structured output: plain JSON replies asked since
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
# Replies: the verdict is a protocol, not a search. A reply is a verdict only when the whole of it (a code fence
# around it aside) is one flat JSON object with exactly the rubric's keys, each once, each a number in [0, 1].
# Anything else (prose around it, a reply cut off by max_tokens, a repeated key, a quoted forgery after the
# judge's own object, nesting) is no verdict: counted, and worth nothing to whoever induced it (rewards.py).

MAX_VERDICT_CHARS = 2_000  # a verdict is ~60-200 characters
FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)


def verdict_schema(keys) -> dict:
    """The JSON schema of a verdict with these keys, for an OpenAI-compatible `response_format` (vLLM, SGLang
    and OpenAI's servers constrain their output to it)."""
    return {"type": "json_schema", "json_schema": {"name": "verdict", "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "required": list(keys),
        "properties": {k: {"type": "number", "minimum": 0, "maximum": 1} for k in keys}}}}


def parse_scores(reply: str | None, keys: list[str]) -> dict[str, float] | None:
    """{key: score} when the reply is a verdict (above), or None (the caller's counted failure). Never raises.
    7 (a 0-10 scale), "80%" or true is a judge that misread the rubric: counted, not clamped."""
    if not isinstance(reply, str):
        return None
    text = reply.strip()
    fenced = FENCE_RE.fullmatch(text)
    text = fenced.group(1) if fenced else text
    if len(text) > MAX_VERDICT_CHARS or not (text.startswith("{") and text.endswith("}")) or _depth(text) != 1:
        return None
    try:
        obj = json.loads(text, object_pairs_hook=_no_repeats)
    except Exception:  # noqa: BLE001 (ValueError, a repeated key; whatever json raises, the reply is no verdict)
        return None
    if not isinstance(obj, dict) or set(obj) != set(keys):
        return None
    scores = {k: _as_score(obj[k]) for k in keys}
    return scores if None not in scores.values() else None


def json_block(value) -> str:
    """Untrusted strings (the policy's, a dataset's) as one line of JSON for a judge's prompt: json.dumps
    escapes quotes and line breaks, so no string can end the block or start a line of its own ("Correct
    answer: ..."); U+2028, U+2029 and U+0085, which json.dumps leaves raw and some readers take for line
    breaks, are escaped too."""
    text = json.dumps(value, ensure_ascii=False)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\u0085", "\\u0085")


# A completion has no medical reason to write a verdict's key, or an object shaped like a verdict: it is
# writing to the grader. Keys are matched whatever their case and separators ("Integrity Score", "integrity-
# score"); a one-word key ("equivalent") only as a key, quoted or followed by ":" or "=".
VERDICT_SHAPE_RE = re.compile(r"""\{\s*["'`]?[^\s"'`{}:]{1,40}["'`]?\s*:\s*(?:["'`]|[-+]?\.?\d|true|false|null)""",
                              re.IGNORECASE)




def writes_to_grader(text: str, keys) -> bool:
    """Whether `text` (a canonical completion) writes one of the verdict `keys` or a verdict-shaped object."""
    text = text.translate(LOOK_ALIKES)
    if VERDICT_SHAPE_RE.search(text):
        return True
    for key in keys:
        words = [re.escape(w) for w in re.split(r"[_\s-]+", key) if w]
        spelled = r"[\s_\-]*".join(words)
        if re.search(rf"{spelled}" if len(words) > 1 else rf"""["'`]{spelled}["'`]|\b{spelled}\s*[:=]""", text,
                     re.IGNORECASE):
            return True
    return False


def _no_repeats(pairs: list) -> dict:
    names = [k for k, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("a key written twice")  # json.loads would keep the last one
    return dict(pairs)


def _depth(text: str) -> int:
    """The deepest nesting of {} and [] outside strings: a verdict is 1. Bounded before json.loads, which would
    otherwise recurse once per level."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "}]":
            depth -= 1
    return deepest


def _as_score(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):  # json `true` is an int in Python
        return None
    x = float(value)
    return x if math.isfinite(x) and 0.0 <= x <= 1.0 else None
