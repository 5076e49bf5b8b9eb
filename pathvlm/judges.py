"""Judges: something that reads (rubric, text, image) and writes a reply. The rubric and the parsing
of the reply belong to the caller (rewards.process_reward, eval.py), so one client serves any rubric.

    judge = make_judge("api", base_url=..., model="gpt-4o", api_key_env="OPENAI_API_KEY")
    replies = judge.complete([JudgeRequest(system=RUBRIC, user=text, image="img.png")])  # str | None each
    log(judge.stats.as_dict())

APIJudge   any OpenAI-compatible chat API: concurrent, retried with back-off, cached on disk.
SelfJudge  the frozen base model (LoRA adapters disabled), greedy: a judge that needs no API.
RuleJudge  (rule_judge.py) rules for the process-reward rubric and eval.py's reasoning-quality rubric,
           which check the reasoning's statement about the image against what the image measures
           (record.image_facts) where a preparer gives it: no model, no cost.

A judge's replies are untrusted text read by verdicts.parse_scores (the whole reply one JSON object with exactly the
rubric's keys, each in [0, 1], or nothing); an API judge is asked for that object by its JSON schema
(response_format), and for plain JSON once its server refuses that. A judge that fails is counted (JudgeStats),
printed at first, and stops the run past a share (judge_down).
"""

import base64
import hashlib
import json
import mimetypes
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from pathvlm.errors import InputError
from pathvlm.rule_judge import RuleJudge
from pathvlm.verdicts import JudgeRequest, JudgeStats, verdict_schema


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
                 timeout: float = 60.0, deadline: float = 120.0, max_tokens: int = 512, cache_dir: str | None = None,
                 use_cache: bool = True):
        import openai

        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(f"the API judge reads its key from the environment variable {api_key_env}, which is "
                             f"not set: export {api_key_env}=... (or use judge=self or judge=rule)")
        self.model, self.base_url, self.api_key_env = model, base_url, api_key_env
        self.max_concurrency, self.max_retries, self.retry_base_delay = max_concurrency, max_retries, retry_base_delay
        self.timeout, self.deadline, self.max_tokens = timeout, deadline, max_tokens
        self.name = f"the API judge {model!r} at {base_url}"
        if use_cache and cache_dir is None:
            from pathvlm.tiny import cache_dir as model_cache_dir
            cache_dir = os.path.join(model_cache_dir(), "judge")
        self.cache_dir = cache_dir if use_cache else None
        # max_retries=0: our loop owns retries, so it can count them and back off across threads
        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)
        self.stats = JudgeStats()
        self.structured = True  # ask for the verdict's JSON schema until the server refuses it

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
        # one deadline for the whole batch: a dead or hanging server costs a step at most `deadline` seconds
        deadline = time.monotonic() + self.deadline
        with ThreadPoolExecutor(max_workers=max(1, self.max_concurrency)) as pool:
            for key, reply in zip(to_call, pool.map(lambda k: self._call(first[k], deadline), to_call)):
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

    def _call(self, r: JudgeRequest, deadline: float) -> str | None:
        """The reply's text, or None (counted, with its reason) when every try failed or the deadline passed.
        Never raises but for JudgeRefused: whatever the server sends back, a training step goes on."""
        import openai

        messages, why = self._messages(r), "no reply"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.add(retries=1)
                # exponential back-off with jitter, so concurrent workers do not retry in lockstep
                pause = min(60.0, self.retry_base_delay * 2 ** (attempt - 1)) * (1 + random.random())
                time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
            left = deadline - time.monotonic()
            if left <= 0:
                why = f"{why}; judge_deadline ({self.deadline:g} s for the batch) passed"
                break
            self.stats.add(calls=1)
            try:
                response = self._create(messages, r.keys, min(self.timeout, left))
            except openai.APIStatusError as e:
                if e.status_code in self.FATAL_STATUS:
                    raise JudgeRefused(f"judge API at {self.base_url} answered HTTP {e.status_code} "
                                       f"({type(e).__name__}) for model {self.model!r}: check the URL, the model "
                                       f"name and the key in ${self.api_key_env}") from None
                why = f"HTTP {e.status_code} from {self.base_url}"
                if e.status_code in self.RETRY_STATUS or e.status_code >= 500:
                    continue
                break
            except openai.APIConnectionError as e:  # includes APITimeoutError
                why = f"{type(e).__name__} reaching {self.base_url}"
                continue
            except Exception as e:  # a 200 whose body is not JSON (an HTML error page, a cut-off body)
                why = f"unreadable reply from {self.base_url} ({type(e).__name__})"
                continue
            content, why = self._content(response)
            if content is not None:
                return content
            if why.startswith("a refusal"):
                break  # asking again would not change it
        self.stats.fail(f"request failed: {why}")
        return None

    def _create(self, messages: list[dict], keys: tuple[str, ...], timeout: float):
        """One chat completion, asked for the verdict's JSON schema while the server takes it. A server that
        answers a schema with HTTP 400 or 422 is asked again at once without it, and from then on (noted once)."""
        import openai

        ask = dict(model=self.model, messages=messages, temperature=0, max_tokens=self.max_tokens, timeout=timeout)
        if self.structured and keys:
            try:
                return self.client.chat.completions.create(**ask, response_format=verdict_schema(keys))
            except openai.APIStatusError as e:
                if e.status_code not in (400, 422):
                    raise
                self._refuse_schema(e.status_code)
        return self.client.chat.completions.create(**ask)

    def _refuse_schema(self, status: int):
        with self.stats._lock:
            first, self.structured = self.structured, False
        if first:
            self.stats.add(schema_refused=1)
            print(f"judge: {self.base_url} answered HTTP {status} to a request for structured output (response_format "
                  "json_schema); asking for plain JSON verdicts from now on, read by the same strict protocol",
                  file=sys.stderr, flush=True)

    def _content(self, response) -> tuple[str | None, str]:
        """(the reply's text, "") from a chat completion, or (None, why) for anything else a server may
        answer with a 200: a bare string (an HTML page), an object without choices, a non-text message."""
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list):
            return None, f"a 200 reply from {self.base_url} that is not a chat completion"
        usage = getattr(response, "usage", None)
        if usage is not None:
            self.stats.add(prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                           completion_tokens=getattr(usage, "completion_tokens", 0) or 0)
        message = getattr(choices[0], "message", None) if choices else None
        content = getattr(message, "content", None)
        if isinstance(content, str):
            return content, ""
        return None, "a refusal or an empty choice"

    # The cache: one JSON file per request, named by the sha256 of everything that decides the reply.
    # Files are written atomically, so processes sharing the directory reuse each other's answers.

    def _cache_key(self, r: JudgeRequest) -> str:
        image_sha = None
        if r.image is not None:
            with open(r.image, "rb") as f:
                image_sha = hashlib.sha256(f.read()).hexdigest()
        blob = json.dumps({"model": self.model, "system": r.system, "user": r.user, "image_sha256": image_sha,
                           "temperature": 0, "max_tokens": self.max_tokens, "keys": list(r.keys)}, sort_keys=True)
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

    def __init__(self, model, processor, max_new_tokens: int = 64, batch_size: int = 8, sampler: str = "static",
                 cuda_graph: bool = False):
        self.model, self.processor = model, processor
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.sampler = {"sampler": sampler, "cuda_graph": cuda_graph}  # sampler.greedy's
        self.stats = JudgeStats()
        self.name = "the self-judge (the frozen base model)"

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
        from pathvlm.images import open_image
        from pathvlm.generation import encode_prompts
        from pathvlm.sampler import greedy

        messages, images = [], []
        for r in requests:
            user = [{"type": "text", "text": r.user}]
            if r.image is not None:
                user.insert(0, {"type": "image"})
                images.append(open_image(r.image))
            messages.append([{"role": "system", "content": r.system}, {"role": "user", "content": user}])
        device = next(self.model.parameters()).device
        inputs = encode_prompts(self.processor, messages, images or None, device)
        out, texts = greedy(self.model, self.processor, inputs, self.max_new_tokens, **self.sampler)
        self.stats.add(calls=len(requests), prompt_tokens=int(inputs["attention_mask"].sum()),
                       completion_tokens=int(out.mask.sum()))
        return texts


# ----------------------------------------------------------------------------------------------

JUDGE_KINDS = ("api", "self", "rule")


def judge_from_config(cfg, model=None, processor=None, **self_settings):
    """The judge a config's JudgeConfig keys name (None for judge=none). judge=self needs the policy's
    model and processor; self_settings go to SelfJudge (max_new_tokens, batch_size), the config's
    sampler keys too."""
    if cfg.judge == "api":
        return make_judge("api", model=cfg.judge_model, base_url=cfg.judge_base_url, api_key_env=cfg.judge_api_key_env,
                          max_concurrency=cfg.judge_concurrency, timeout=cfg.judge_timeout,
                          deadline=cfg.judge_deadline, max_retries=cfg.judge_max_retries,
                          cache_dir=cfg.judge_cache_dir)
    if cfg.judge == "self":
        from pathvlm.sampler import sampler_settings  # torch: only for the self-judge

        device = next(model.parameters()).device
        return make_judge("self", model=model, processor=processor, **sampler_settings(cfg, device), **self_settings)
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
        return RuleJudge()  # its own file: the rules are longer than the clients
    raise ValueError(f"unknown judge kind '{kind}': use one of {', '.join(JUDGE_KINDS)} or none")
