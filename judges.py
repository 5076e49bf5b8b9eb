"""Judges: something that reads (rubric, text, image) and writes a reply. The rubric and the parsing
of the reply belong to the caller (rewards.process_reward, eval.py), so one client serves any rubric.

    judge = make_judge("api", base_url=..., model="gpt-4o", api_key_env="OPENAI_API_KEY")
    replies = judge.complete([JudgeRequest(system=RUBRIC, user=text, image="img.png")])  # str | None each
    log(judge.stats.as_dict())

APIJudge   any OpenAI-compatible chat API: concurrent, retried with back-off, cached on disk.
SelfJudge  the frozen base model (LoRA adapters disabled), greedy: a judge that needs no API.
RuleJudge  keyword rules for the process-reward rubric and eval.py's reasoning-quality rubric:
           no model, no cost, a baseline.
"""

import base64
import hashlib
import json
import math
import mimetypes
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import mcq
from config import InputError


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
    fallbacks: int = 0  # replies that failed or could not be parsed, scored by the fallback rule
    no_think: int = 0  # completions without a <think> block, scored 0 without asking the judge
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int):
        with self._lock:  # APIJudge's worker threads count concurrently
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


# ----------------------------------------------------------------------------------------------
# Replies: a JSON object of scores, however the judge wrapped it

FENCED_JSON_RE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL | re.IGNORECASE)
# after a key name: quotes, bold stars or spaces, then ':' or '=', then the number (".8" included)
KEY_VALUE_TAIL = r"""[\s*"'`]{0,6}[:=][\s*"'`]{0,4}(-?(?:\d+(?:\.\d*)?|\.\d+))"""


def parse_scores(reply: str | None, keys: list[str]) -> dict[str, float] | None:
    """{key: score clamped to [0, 1]} from a judge's reply, or None when some key has no number.
    Tries, in order: the reply as JSON; a ```json fenced block; `key ... : number` anywhere."""
    if not isinstance(reply, str):
        return None
    for text in [reply.strip()] + FENCED_JSON_RE.findall(reply):
        try:
            obj = json.loads(text)
        except ValueError:
            continue
        if isinstance(obj, dict):
            scores = {k: _as_score(obj.get(k)) for k in keys}
            if None not in scores.values():
                return scores
    scores = {}
    for k in keys:
        # "integrity_score": 0.8  /  integrity score = .8  /  **Integrity score:** 0.8
        m = re.search(re.escape(k).replace("_", "[_ ]") + KEY_VALUE_TAIL, reply, re.IGNORECASE)
        scores[k] = _as_score(m.group(1)) if m else None
    return scores if None not in scores.values() else None


def _as_score(value) -> float | None:
    if isinstance(value, bool):  # json `true` is an int in Python, and no score
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return min(1.0, max(0.0, x)) if math.isfinite(x) else None


# ----------------------------------------------------------------------------------------------
# APIJudge: any OpenAI-compatible chat completions endpoint

class JudgeRefused(InputError, RuntimeError):
    """The API refused the key, the model or the URL: the scripts stop with this message, no traceback."""


class APIJudge:
    # 408/409/429 and 5xx are worth another try; other 4xx would fail the same way again
    RETRY_STATUS = {408, 409, 429}
    # a wrong key, model or URL: every call would fail, so stop the run instead of scoring fallbacks
    FATAL_STATUS = {401, 403, 404}

    def __init__(self, model: str, base_url: str = "https://api.openai.com/v1", api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 8, max_retries: int = 4, retry_base_delay: float = 1.0,
                 timeout: float = 60.0, max_tokens: int = 512, cache_dir: str | None = None, use_cache: bool = True):
        import openai

        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(f"the API judge reads its key from the environment variable {api_key_env}, which is "
                             f"not set: export {api_key_env}=... (or use judge=self or judge=rule)")
        self.model, self.base_url, self.api_key_env = model, base_url, api_key_env
        self.max_concurrency, self.max_retries, self.retry_base_delay = max_concurrency, max_retries, retry_base_delay
        self.max_tokens = max_tokens
        if use_cache and cache_dir is None:
            from tiny import cache_dir as model_cache_dir
            cache_dir = os.path.join(model_cache_dir(), "judge")
        self.cache_dir = cache_dir if use_cache else None
        # max_retries=0: our loop owns retries, so it can count them and back off across threads
        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)
        self.stats = JudgeStats()

    def __repr__(self):  # never shows the key
        return f"APIJudge(model={self.model!r}, base_url={self.base_url!r}, cache_dir={self.cache_dir!r})"

    def complete(self, requests: list[JudgeRequest]) -> list[str | None]:
        keys = [self._cache_key(r) for r in requests]
        first = {}  # cache key -> the first request with it: identical requests are paid once
        for key, r in zip(keys, requests):
            first.setdefault(key, r)
        replies = {key: self._cache_get(key) for key in first}
        to_call = [key for key, reply in replies.items() if reply is None]
        self.stats.add(cache_hits=len(requests) - len(to_call))
        with ThreadPoolExecutor(max_workers=max(1, self.max_concurrency)) as pool:
            for key, reply in zip(to_call, pool.map(lambda k: self._call(first[k]), to_call)):
                replies[key] = reply
                if reply is not None:
                    self._cache_put(key, reply)
        return [replies[key] for key in keys]

    def _messages(self, r: JudgeRequest) -> list[dict]:
        content = [{"type": "text", "text": r.user}]
        if r.image is not None:
            mime = mimetypes.guess_type(r.image)[0] or "image/png"
            with open(r.image, "rb") as f:
                data = base64.b64encode(f.read()).decode("ascii")
            content.insert(0, {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}})
        return [{"role": "system", "content": r.system}, {"role": "user", "content": content}]

    def _call(self, r: JudgeRequest) -> str | None:
        import openai

        messages = self._messages(r)
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.add(retries=1)
                # exponential back-off with jitter, so concurrent workers do not retry in lockstep
                time.sleep(min(60.0, self.retry_base_delay * 2 ** (attempt - 1)) * (1 + random.random()))
            self.stats.add(calls=1)
            try:
                response = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                               max_tokens=self.max_tokens)
            except openai.APIStatusError as e:
                if e.status_code in self.FATAL_STATUS:
                    raise JudgeRefused(f"judge API at {self.base_url} answered HTTP {e.status_code} "
                                       f"({type(e).__name__}) for model {self.model!r}: check the URL, the model "
                                       f"name and the key in ${self.api_key_env}") from None
                if e.status_code in self.RETRY_STATUS or e.status_code >= 500:
                    continue
                break
            except openai.APIConnectionError:  # includes APITimeoutError
                continue
            usage = response.usage
            if usage is not None:
                self.stats.add(prompt_tokens=usage.prompt_tokens or 0, completion_tokens=usage.completion_tokens or 0)
            content = response.choices[0].message.content if response.choices else None
            if content is not None:
                return content
            break  # a refusal or an empty choice: asking again would not change it
        self.stats.add(failures=1)
        return None

    # The cache: one JSON file per request, named by the sha256 of everything that decides the reply.
    # Files are written atomically, so processes sharing the directory reuse each other's answers.

    def _cache_key(self, r: JudgeRequest) -> str:
        image_sha = None
        if r.image is not None:
            with open(r.image, "rb") as f:
                image_sha = hashlib.sha256(f.read()).hexdigest()
        blob = json.dumps({"model": self.model, "system": r.system, "user": r.user, "image_sha256": image_sha,
                           "temperature": 0, "max_tokens": self.max_tokens}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cache_path(self, key: str) -> str:
        return os.path.join(self.cache_dir, key[:2], f"{key}.json")

    def _cache_get(self, key: str) -> str | None:
        if self.cache_dir is None:
            return None
        try:
            with open(self._cache_path(key)) as f:
                return json.load(f)["reply"]
        except (OSError, ValueError, KeyError):
            return None

    def _cache_put(self, key: str, reply: str):
        if self.cache_dir is None:
            return
        path = self._cache_path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"model": self.model, "reply": reply}, f)
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# SelfJudge: the policy's own base model, adapters off

class SelfJudge:
    """Greedy replies from the frozen base model. With a PEFT model the adapters are disabled for
    the call, so the judge does not drift with the policy it grades."""

    def __init__(self, model, processor, max_new_tokens: int = 64, batch_size: int = 8):
        self.model, self.processor = model, processor
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.stats = JudgeStats()

    def complete(self, requests: list[JudgeRequest]) -> list[str | None]:
        import contextlib

        replies: list[str | None] = [None] * len(requests)
        # the processor takes a batch with an image in every prompt or in none
        groups = [[i for i, r in enumerate(requests) if r.image is not None],
                  [i for i, r in enumerate(requests) if r.image is None]]
        batches = [g[s:s + self.batch_size] for g in groups for s in range(0, len(g), self.batch_size)]
        adapters_off = getattr(self.model, "disable_adapter", contextlib.nullcontext)  # a plain model is the base
        was_training = self.model.training
        self.model.eval()  # a judge answers deterministically: no dropout
        try:
            with adapters_off():
                for batch in batches:
                    for i, text in zip(batch, self._generate([requests[i] for i in batch])):
                        replies[i] = text
        finally:
            self.model.train(was_training)
        return replies

    def _generate(self, requests: list[JudgeRequest]) -> list[str]:
        from PIL import Image

        from model import completion_mask, encode_prompts, generate, stop_token_ids

        messages, images = [], []
        for r in requests:
            user = [{"type": "text", "text": r.user}]
            if r.image is not None:
                user.insert(0, {"type": "image"})
                images.append(Image.open(r.image).convert("RGB"))
            messages.append([{"role": "system", "content": r.system}, {"role": "user", "content": user}])
        device = next(self.model.parameters()).device
        inputs = encode_prompts(self.processor, messages, images or None, device)
        ids, texts = generate(self.model, self.processor, inputs, self.max_new_tokens)
        self.stats.add(calls=len(requests), prompt_tokens=int(inputs["attention_mask"].sum()),
                       completion_tokens=int(completion_mask(ids, stop_token_ids(self.processor.tokenizer)).sum()))
        return texts


# ----------------------------------------------------------------------------------------------
# RuleJudge: the process-reward and reasoning-quality rubrics by keywords

IMAGE_WORDS = ("image", "patch", "slide", "field", "shows", "seen", "visible", "stain", "staining", "stained",
               "colour", "color", "brown", "blue", "pink", "purple", "red", "violet", "hematoxylin", "haematoxylin",
               "eosin", "dab", "nuclei", "nucleus", "nuclear", "cell", "cells", "cytoplasm", "tissue", "gland",
               "glands", "stroma", "dense", "sparse", "region", "pattern", "architecture", "membrane", "mitoses")
ELIMINATION_CUES = ("ruled out", "rule out", "rules out", "excluded", "exclude", "excludes", "unlikely", "not",
                    "rather than", "instead of", "inconsistent")
KNOWLEDGE_CUES = ("because", "since", "due to", "therefore", "indicates", "indicate", "indicating", "suggests",
                  "characteristic", "typical", "typically", "marker", "marks", "hallmark", "consistent with",
                  "diagnostic", "defined", "definition", "criteria", "criterion", "known")
CONCLUSION_RE = re.compile(r"\b(?i:answer|choice|option|diagnosis)\s*(?:is|:|=)\s*\(?([A-Z])\b\)?")


def _count_words(text: str, words) -> int:
    return sum(len(re.findall(rf"\b{re.escape(w)}\b", text, re.IGNORECASE)) for w in words)


def _eliminated(options: list[str], think: str, chosen: str | None) -> tuple[int, int]:
    """(options the reasoning sets aside, how many it needs to): other options it names, or as many
    elimination cues as that, whichever is more. With two options there is only one to eliminate."""
    letters = mcq.LETTERS[:len(options)]
    others = [o for letter, o in zip(letters, options) if letter != chosen]
    named = sum(_count_words(think, [o]) > 0 for o in others)
    return max(named, _count_words(think, ELIMINATION_CUES)), min(2, len(options) - 1)


def _contradictions(options: list[str], think: str, chosen: str | None) -> int:
    """0-2: the reasoning concludes a letter other than the answer; it rules the answer itself out."""
    errors = 0
    concluded = CONCLUSION_RE.findall(think)
    if concluded and chosen is not None and concluded[-1] != chosen:
        errors += 1
    if chosen is not None:
        text = re.escape(options[mcq.LETTERS.index(chosen)])
        rules_out_answer = (rf"\b{text}\s+(?:is|are)\s+(?:ruled out|excluded|unlikely|not)\b|"
                            rf"\b(?:rule out|ruled out|exclude|excluded|not)\s+{text}\b")
        errors += bool(re.search(rules_out_answer, think, re.IGNORECASE))
    return errors


def rule_scores(options: list[str], think: str, chosen: str | None) -> dict[str, float]:
    """The rubric's arithmetic on keyword evidence. integrity = 1 - 0.4 per missing step among
    (image features, >= 2 options eliminated, knowledge cited); knowledge = 1 - 0.4 per contradiction
    found among (a conclusion in the reasoning other than the answer, the answer itself ruled out)."""
    eliminated, needed = _eliminated(options, think, chosen)
    missing = [_count_words(think, IMAGE_WORDS) == 0, eliminated < needed, _count_words(think, KNOWLEDGE_CUES) == 0]
    return {"integrity_score": max(0.0, 1.0 - 0.4 * sum(missing)),
            "knowledge_score": max(0.0, 1.0 - 0.4 * _contradictions(options, think, chosen))}


# eval.py's reasoning-quality rubric by keywords: a floor to compare model judges against, not a grader
DOMAIN_TERMS = IMAGE_WORDS + (
    "histology", "histological", "histopathology", "morphology", "immunohistochemistry", "ihc", "antigen",
    "epithelium", "epithelial", "mucosa", "lymphocytes", "inflammation", "inflammatory", "necrosis", "fibrosis",
    "carcinoma", "adenocarcinoma", "neoplasm", "neoplastic", "malignant", "benign", "lesion", "atypia",
    "pleomorphism", "pleomorphic", "hyperchromatic", "chromatin", "nucleoli", "mitosis", "mitotic", "invasion",
    "differentiation", "differentiated", "keratin", "mucin")
SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n+")


def rule_reasoning_scores(options: list[str], completion: str, think: str, chosen: str | None,
                          gold: str) -> dict[str, float]:
    """eval.py's six criteria from keywords and lengths; `think` is "" when there is no <think> block.
    reasoning_accuracy  0 without reasoning or with a wrong/missing answer; else 1, or 0.5 when the
                        reasoning contradicts the answer (concludes another letter, rules it out)
    knowledge_accuracy  min(1, knowledge cues / 2): "because", "marker", "criteria", ...
    rigor               min(1, options set aside / 2), or / 1 with two options
    professionalism     min(1, distinct pathology terms / 4)
    clarity             0.5 for the exact <think>…</think><answer>…</answer> format, + 0.5 when the
                        reasoning's sentences average 4-35 words
    conciseness         1 up to 150 words of completion, falling linearly to 0 at 450, times the
                        share of its sentences that are not repeats"""
    sentences = [s.strip().lower() for s in SENTENCE_SPLIT_RE.split(think) if s.strip()]
    right = think.strip() != "" and chosen is not None and chosen == gold
    eliminated, needed = _eliminated(options, think, chosen)
    terms = sum(_count_words(think, [t]) > 0 for t in DOMAIN_TERMS)
    words_per_sentence = len(think.split()) / len(sentences) if sentences else 0.0
    untagged = re.sub(r"</?(?:think|answer)>", " ", completion)
    all_sentences = [s.strip().lower() for s in SENTENCE_SPLIT_RE.split(untagged) if s.strip()]
    unique_share = len(set(all_sentences)) / len(all_sentences) if all_sentences else 1.0
    length_factor = min(1.0, max(0.0, (450 - len(completion.split())) / 300))
    return {"reasoning_accuracy": (0.5 if _contradictions(options, think, chosen) else 1.0) if right else 0.0,
            "knowledge_accuracy": min(1.0, _count_words(think, KNOWLEDGE_CUES) / 2),
            "rigor": 0.0 if not sentences else 1.0 if needed == 0 else min(1.0, eliminated / needed),
            "professionalism": min(1.0, terms / 4),
            "clarity": 0.5 * mcq.is_well_formed(completion) + 0.5 * (4 <= words_per_sentence <= 35),
            "conciseness": length_factor * unique_share}


class RuleJudge:
    """Reads `request.case` and replies with the rubric's JSON, so its replies go through the same
    parser as a model judge's. case["rubric"] == "reasoning" (eval.py: options, completion, think,
    chosen, gold) -> rule_reasoning_scores; otherwise the process rubric (options, think, chosen)."""

    def __init__(self):
        self.stats = JudgeStats()

    def complete(self, requests: list[JudgeRequest]) -> list[str | None]:
        replies = []
        for r in requests:
            if r.case is None:
                raise ValueError("RuleJudge needs JudgeRequest.case (options, think, chosen, ...); it scores "
                                 "only the process-reward rubric and eval.py's reasoning rubric")
            c = r.case
            if c.get("rubric") == "reasoning":
                scores = rule_reasoning_scores(c["options"], c["completion"], c["think"], c.get("chosen"), c["gold"])
            else:
                scores = rule_scores(c["options"], c["think"], c.get("chosen"))
            replies.append(json.dumps(scores))
        self.stats.add(calls=len(requests))
        return replies


# ----------------------------------------------------------------------------------------------

JUDGE_KINDS = ("api", "self", "rule")


def judge_from_config(cfg, model=None, processor=None, **self_settings):
    """The judge a config's JudgeConfig keys name (None for judge=none). judge=self needs the policy's
    model and processor; self_settings go to SelfJudge (max_new_tokens, batch_size)."""
    if cfg.judge == "api":
        return make_judge("api", model=cfg.judge_model, base_url=cfg.judge_base_url, api_key_env=cfg.judge_api_key_env,
                          max_concurrency=cfg.judge_concurrency, timeout=cfg.judge_timeout,
                          max_retries=cfg.judge_max_retries, cache_dir=cfg.judge_cache_dir)
    if cfg.judge == "self":
        return make_judge("self", model=model, processor=processor, **self_settings)
    return make_judge(cfg.judge)


def make_judge(kind: str, **settings):
    """kind: api (settings: APIJudge's arguments) | self (model=, processor=, ...) | rule | none -> None."""
    if kind == "none":
        return None
    if kind == "api":
        return APIJudge(**settings)
    if kind == "self":
        if "model" not in settings or "processor" not in settings:
            raise ValueError("make_judge('self') needs model= and processor= (the policy's PeftModel)")
        return SelfJudge(**settings)
    if kind == "rule":
        return RuleJudge()
    raise ValueError(f"unknown judge kind '{kind}': use one of {', '.join(JUDGE_KINDS)} or none")
