"""What the training loops run over and over: a group's G completions sampled with one prefill of their
prompt, and per-token log-probs computed a chunk of the vocabulary projection at a time, with each
prompt run once for its group (its keys/values shared by the G completions, gradients included); Rows,
a GRPO step's sequences with what every pass over them shares; and DAPO's dynamic sampling, which draws
groups until enough of them teach something. Every function here is checked against the plain computation
it replaces (tests/test_train_grpo.py, tests/test_model.py).
"""

import contextlib

import torch
import torch.utils.checkpoint
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pathvlm.grpo import equal_reward_groups
from pathvlm.model import autocast, unwrap


@torch.no_grad()
def generate_groups(model, prompt: dict, features: dict, group_size: int, config: GenerationConfig,
                    **generate_kwargs) -> torch.Tensor:
    """G sampled completions per prompt, with the prompt's prefill computed once, not G times.

    generate(num_return_sequences=G) copies each prompt G times before the prefill; a prompt of
    ~1,000 tokens then costs G full forward passes before the first new token. Instead we prefill
    all but the last prompt token once per prompt, copy that KV cache (and the M-RoPE offsets) G
    times, and let generate continue from there. Same tokens as the plain call (tested), about half
    the time on the demo. Returns the (B*G, P + T) ids, as generate does (or generate's output object
    when generate_kwargs ask for one)."""
    base = unwrap(model)
    with autocast(model):
        prefill = base(input_ids=prompt["input_ids"][:, :-1], attention_mask=prompt["attention_mask"][:, :-1],
                       mm_token_type_ids=prompt["mm_token_type_ids"][:, :-1], image_grid_thw=prompt["image_grid_thw"],
                       mm_encoder_outputs={"image": features["image"]}, use_cache=True, logits_to_keep=1)
        cache = prefill.past_key_values
        cache.batch_repeat_interleave(group_size)
        base.model.rope_deltas = base.model.rope_deltas.repeat_interleave(group_size, 0)  # (B*G, 1)
        return base.generate(input_ids=prompt["input_ids"].repeat_interleave(group_size, 0),
                             attention_mask=prompt["attention_mask"].repeat_interleave(group_size, 0),
                             past_key_values=cache, generation_config=config, **generate_kwargs)


def repeat_prompts(inputs: dict, repeat: int) -> dict:
    """Each prompt row repeated `repeat` times (rows i*repeat ... i*repeat+repeat-1 share prompt i)."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")  # one image per prompt
    return {k: inputs[k].repeat_interleave(repeat, 0) for k in keys}


def _selected_logprobs(hidden, lm_head, targets, temperature, suppressed):
    logits = lm_head(hidden).float() / temperature  # (n, V): only `chunk_size` rows of the vocab projection at a time
    if suppressed is not None:
        logits = logits.index_fill(-1, suppressed, float("-inf"))  # as the sampler's suppress_tokens does
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def completion_logprobs(model, prompt: dict, completion_ids, completion_mask, features=None, position_ids=None,
                        chunk_size: int = 1024, temperature: float = 1.0, suppressed: list[int] | None = None):
    """log π(c_t | prompt, c_<t) for every completion token -> (N, T).

    π is softmax(logits / temperature) without the `suppressed` token ids: for GRPO, exactly the
    distribution generation_config(temperature=T) samples from (tested); for SFT, the plain model.

    prompt: left-padded prompt rows (input_ids, attention_mask, mm_token_type_ids, image_grid_thw and
    either pixel_values or precomputed `features`); completion_ids/mask: (N, T), right-padded.
    The vocab projection runs on `chunk_size` tokens at a time (recomputed in backward), so the
    (N, T, vocab) fp32 logits never exist at once: 16 x 1024 x 152k floats would be 10 GB."""
    base = unwrap(model)
    n_prompt = prompt["input_ids"].shape[1]
    kwargs = dict(
        input_ids=torch.cat([prompt["input_ids"], completion_ids], 1),
        attention_mask=torch.cat([prompt["attention_mask"], completion_mask], 1),
        mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion_ids)], 1),
        image_grid_thw=prompt["image_grid_thw"], position_ids=position_ids)
    if features is not None:
        kwargs["mm_encoder_outputs"] = features
    else:
        kwargs["pixel_values"] = prompt["pixel_values"]
    with autocast(model):
        hidden = base.model(**kwargs).last_hidden_state[:, n_prompt - 1:-1]  # (N, T, H): states that predict c_t
        return token_logprobs(base.lm_head, hidden, completion_ids, chunk_size, temperature, suppressed)


def token_logprobs(lm_head, hidden, targets, chunk_size: int = 1024, temperature: float = 1.0,
                   suppressed: list[int] | None = None) -> torch.Tensor:
    """log softmax(lm_head(hidden) / temperature)[target], the `suppressed` ids left out of the softmax,
    for (N, T, H) hidden states -> (N, T), chunk by chunk."""
    n, t, h = hidden.shape
    flat_hidden, flat_targets = hidden.reshape(n * t, h), targets.reshape(n * t)
    suppressed = None if not suppressed else torch.tensor(suppressed, device=hidden.device)
    pieces = []
    for i in range(0, n * t, chunk_size):
        args = (flat_hidden[i:i + chunk_size], lm_head, flat_targets[i:i + chunk_size], temperature, suppressed)
        if torch.is_grad_enabled():
            pieces.append(torch.utils.checkpoint.checkpoint(_selected_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(_selected_logprobs(*args))
    return torch.cat(pieces).view(n, t)


class _PromptKV(DynamicLayer):
    """The prompt pass's cache layer: attention sees only the prompt's own keys/values, which are kept
    for the completions. A second call (gradient checkpointing replaying the layer in backward)
    overwrites them with the same values instead of appending."""

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0  # nothing precedes the prompt


class _PrefixKV(DynamicLayer):
    """The completions' cache layer: the prompt's keys/values (repeated for the G completions) stay
    as they are, and each call returns them followed by the completion's. Nothing is written, so a
    replay under gradient checkpointing sees exactly what the first pass saw."""

    def __init__(self, keys, values):
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True
        self.dtype, self.device = keys.dtype, keys.device

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)


@contextlib.contextmanager
def _cache_under_checkpointing(language_model):
    """Let checkpointed decoder layers keep the caches above (transformers drops a cache under
    checkpointing unless the layer says replays are safe, which they are for _PromptKV/_PrefixKV)."""
    for layer in language_model.layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in language_model.layers:
            del layer._can_checkpoint_with_cache


def shared_prompt_logprobs(model, prompt: dict, features: dict, completion_ids, completion_mask, group_size: int,
                           position_ids, chunk_size: int = 1024, temperature: float = 1.0,
                           suppressed: list[int] | None = None) -> torch.Tensor:
    """completion_logprobs for B*G completions of B prompts, running each prompt once instead of G
    times: its keys/values are repeated for the G completions. With gradients on, they flow back
    through the copies into the prompt's one pass, with or without gradient checkpointing.
    prompt/features: B rows; completion_ids/mask: (N, T); position_ids: (3, N, P + T) as train_grpo's
    Rows builds them. Equal to completion_logprobs up to float rounding, gradients included (tested)."""
    base = unwrap(model)
    n_prompt, n_completion = prompt["input_ids"].shape[1], completion_ids.shape[1]
    with _cache_under_checkpointing(base.model.language_model), autocast(model):
        prompt_kv = Cache(layer_class_to_replicate=_PromptKV)
        out = base.model(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"],
                         mm_token_type_ids=prompt["mm_token_type_ids"], image_grid_thw=prompt["image_grid_thw"],
                         mm_encoder_outputs={"image": features["image"]},
                         position_ids=position_ids[:, ::group_size, :n_prompt], past_key_values=prompt_kv)
        if len(prompt_kv.layers) != len(base.model.language_model.layers):
            raise RuntimeError("transformers dropped the prompt's KV cache under gradient checkpointing: this needs "
                               "the transformers version pinned in requirements.txt")
        hidden = out.last_hidden_state[:, -1:].repeat_interleave(group_size, 0)  # (N, 1, H): predicts c_0
        if n_completion > 1:  # else every completion is EOS alone: the prompt's last state is all we need
            prefix = Cache(layers=[_PrefixKV(layer.keys.repeat_interleave(group_size, 0),
                                             layer.values.repeat_interleave(group_size, 0))
                                   for layer in prompt_kv.layers])
            attention_mask = torch.cat([prompt["attention_mask"].repeat_interleave(group_size, 0), completion_mask], 1)
            rest = base.model.language_model(
                inputs_embeds=base.model.get_input_embeddings()(completion_ids[:, :-1]),
                attention_mask=attention_mask[:, :-1], past_key_values=prefix,
                position_ids=position_ids[:, :, n_prompt:n_prompt + n_completion - 1])
            hidden = torch.cat([hidden, rest.last_hidden_state], 1)  # (N, T, H)
        return token_logprobs(base.lm_head, hidden, completion_ids, chunk_size, temperature, suppressed)


@contextlib.contextmanager
def lora_merged(model, enabled: bool):
    """Sample with the LoRA update folded into the base weights: one matmul per layer instead of
    three (a quarter less sampling time on the demo). A 4-bit base cannot hold the sum, so it is only
    done on unquantised bases. Unmerging subtracts the update back with rounding error, so the
    original weights are copied back exactly, at the cost of one copy of the adapted layers."""
    if not enabled:
        yield
        return
    originals = [(p, p.detach().clone()) for name, p in model.named_parameters() if ".base_layer." in name]
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for p, original in originals:
                p.copy_(original)


def merge_while_sampling(cfg, device) -> bool:
    """merge_for_sampling=auto: on CPU only. The exact restore copies every adapted layer (~13 GB for
    the unquantised 7B), which a GPU run would rather spend elsewhere; a 4-bit base cannot merge at all."""
    merge = device.type == "cpu" if cfg.merge_for_sampling == "auto" else cfg.merge_for_sampling
    return merge and cfg.quantization == "none"


# ----------------------------------------------------------------------------------------------
# A GRPO step's sequences and the passes over them

class Rows:
    """The N = B*G sequences of a step, prompt + completion, with what every forward pass over them
    shares: the vision features and the M-RoPE position ids, both computed once per step, and the
    distribution the completions were sampled from (temperature, suppressed tokens), which every
    log-prob pass scores. `part(i, n)` slices out a micro-batch of rows; `prompt_part`/`features_part`
    its distinct prompts."""

    def __init__(self, model, prompt, features, ids, mask, group_size, temperature=1.0, suppressed=None):
        self.group_size, self.unique_prompt, self.unique_features = group_size, prompt, features
        self.sampling = dict(temperature=temperature, suppressed=suppressed)
        self.prompt = repeat_prompts(prompt, group_size)  # (N, P) rows aligned with the completions
        self.features = [f for f in features["image"].pooler_output for _ in range(group_size)]
        self.ids, self.mask = ids, mask
        with torch.no_grad():
            # M-RoPE positions of each prompt once (transformers loops over rows in Python); the
            # completion's text tokens then count on from the prompt's largest position
            prompt_pos, _ = unwrap(model).model.get_rope_index(
                prompt["input_ids"], prompt["mm_token_type_ids"], prompt["image_grid_thw"],
                attention_mask=prompt["attention_mask"])  # (3, B, P)
            prompt_pos = prompt_pos.repeat_interleave(group_size, 1)  # (3, N, P)
            start = prompt_pos.amax(dim=(0, 2)) + 1  # (N,)
            steps = torch.arange(ids.shape[1], device=ids.device)
            completion_pos = (start[:, None] + steps[None, :]).expand(3, -1, -1)  # (3, N, T)
            self.position_ids = torch.cat([prompt_pos, completion_pos], 2)  # (3, N, P + T)

    def columns(self, start: int, size: int) -> tuple[int, int]:
        """(first prompt column that any of rows start ... start+size uses, their longest completion):
        every column outside is padding in all of these rows (prompts are left-padded to the step's
        longest, completions right-padded to its longest), which costs compute and changes no log-prob."""
        sl = slice(start, start + size)
        first = int(self.prompt["attention_mask"][sl].any(0).int().argmax())
        width = max(1, int(self.mask[sl].sum(1).max()))
        return first, width

    def prompt_part(self, start: int, size: int, first: int = 0) -> dict:
        """The distinct prompts of rows start ... start+size (whole groups), one row each, from column `first`."""
        return cut(self.unique_prompt, slice(start // self.group_size, (start + size) // self.group_size), first)

    def features_part(self, start: int, size: int) -> dict:
        sl = slice(start // self.group_size, (start + size) // self.group_size)
        out = self.unique_features["image"]
        return {"image": BaseModelOutputWithPooling(pooler_output=tuple(out.pooler_output[sl]))}

    def part(self, start: int, size: int, first: int = 0, width: int | None = None) -> dict:
        """Rows start ... start+size: prompts from column `first`, completions' first `width` tokens."""
        sl, width = slice(start, start + size), width or self.ids.shape[1]
        end = self.prompt["input_ids"].shape[1] + width
        return dict(prompt=cut(self.prompt, sl, first), completion_ids=self.ids[sl, :width],
                    completion_mask=self.mask[sl, :width], position_ids=self.position_ids[:, sl, first:end],
                    features={"image": BaseModelOutputWithPooling(pooler_output=tuple(self.features[sl]))})

    def logprobs(self, model, start: int, size: int, chunk_size: int, share_prompt: bool) -> torch.Tensor:
        """log π of the completions of rows start ... start+size (whole groups) -> (size, T), zero
        where the completion has ended. Columns that are padding in all these rows are left out.
        share_prompt: each prompt runs once for its group (what the loop does); else every row in full
        (the plain pass it equals, for tests)."""
        first, width = self.columns(start, size)
        if share_prompt:
            part = self.part(start, size, first, width)
            logp = shared_prompt_logprobs(model, self.prompt_part(start, size, first), self.features_part(start, size),
                                          part["completion_ids"], part["completion_mask"], self.group_size,
                                          part["position_ids"], chunk_size=chunk_size, **self.sampling)
        else:
            logp = completion_logprobs(model, **self.part(start, size, first, width), chunk_size=chunk_size,
                                       **self.sampling)
        return torch.nn.functional.pad(logp, (0, self.ids.shape[1] - width)) * self.mask[start:start + size]


def cut(prompt: dict, rows: slice, first: int) -> dict:
    """prompt[rows], token columns from `first` on (image_grid_thw has one row per image, no columns)."""
    return {k: v[rows] if k == "image_grid_thw" else v[rows, first:] for k, v in prompt.items() if k != "pixel_values"}


# ----------------------------------------------------------------------------------------------
# DAPO's dynamic sampling (dynamic_sampling=true): off the default path

def informative_groups(sampled: dict, sample_more, cfg, any_process, encode, pad_id: int
                       ) -> tuple[dict, torch.Tensor, dict]:
    """Groups whose rewards are all equal have advantage 0 and teach nothing, so they are dropped and more
    prompts drawn (sample_more() -> another `sampled`) until cfg.num_prompts groups differ, or
    cfg.max_sampling_rounds is reached; then the step goes on with what it has, filled up with dropped groups
    that get no loss (every process keeps num_prompts groups). `sampled`: train_grpo.sample_and_score's dict;
    any_process(flag): whether any process has it (training.Processes.any); encode(records) -> their prompts.
    -> (the step's groups, a (B,) bool: filler, counts for the log)."""
    G, kept, spare, rounds = cfg.group_size, [], [], 0
    while True:
        rounds += 1
        rewards = torch.tensor(sampled["scores"]["total"])  # (B*G,)
        for b, equal in enumerate(equal_reward_groups(rewards, G).tolist()):
            (spare if equal else kept).append((sampled, b))
        # every process draws as long as any still needs groups: the data order is one for all of them
        if not any_process(len(kept) < cfg.num_prompts) or rounds == cfg.max_sampling_rounds:
            break
        sampled = sample_more()
    drawn, dropped = rounds * cfg.num_prompts, len(spare)  # dropped: every equal-reward group drawn
    chosen = (kept + spare)[:cfg.num_prompts]
    filler = torch.tensor([i >= len(kept) for i in range(len(chosen))])
    batch = [s["batch"][b] for s, b in chosen]
    rows = [(s, b * G + g) for s, b in chosen for g in range(G)]
    width = max(s["ids"].shape[1] for s, _ in rows)  # completions right-padded to the longest
    pad = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
    # the chosen prompts under one left-padding; their image features as each round computed them
    features = BaseModelOutputWithPooling(pooler_output=[s["features"]["image"].pooler_output[b] for s, b in chosen])
    groups = dict(batch=batch, prompt=encode(batch), features={"image": features},
                  ids=torch.cat([pad(s["ids"][i:i + 1], pad_id) for s, i in rows]),
                  mask=torch.cat([pad(s["mask"][i:i + 1], 0) for s, i in rows]),
                  logprobs=None if sampled["logprobs"] is None else  # sampler=hf returns none
                  torch.cat([pad(s["logprobs"][i:i + 1], 0.0) for s, i in rows]),
                  texts=[s["texts"][i] for s, i in rows], truncated=torch.stack([s["truncated"][i] for s, i in rows]),
                  records=[s["records"][i] for s, i in rows],
                  scores={k: [s["scores"][k][i] for s, i in rows] for k in sampled["scores"]})
    return groups, filler, {"groups_drawn": drawn, "groups_dropped": dropped, "groups_short": int(filler.sum())}
