"""The sampler: G completions per prompt, token by token, with a key/value cache allocated once.

Read it beside grpo.py: this file makes the completions and the log-probs π_old(c_t) the objective's
ratios start from; grpo.py turns them into a loss.

Why not transformers' generate: for each new token it rebuilds the attention mask, grows every layer's
cache by concatenation, runs a dozen logits processors and stopping criteria, all in Python. On a GPU
that is ~30-45 ms a token of launches for ~8 ms of arithmetic (the 7B); on the tiny model on a CPU it is
nearly all of the time. Here a decode step has fixed shapes:

    prefill   each prompt once (vision features, M-RoPE positions) -> keys/values copied to its G rows
    buffers   K, V: (N, kv_heads, P + T, head_dim) per layer; `allowed` (N, P + T): columns a row may attend
    step t    write the token's K/V at column P + t, attend to all P + T columns through `allowed`,
              sample the next token on the device, count positions on by one

so the same step can be recorded once as a CUDA graph and replayed (cuda_graph=true): one launch a token.

The distribution is generation.generation_config's: softmax(logits / temperature) without the special
tokens, top_p if < 1, nothing else; temperature 0 is greedy. Each token's log-prob under the full softmax
(the one rollout.Rows scores, top_p or not) comes back beside it: GRPO logs the gap to the trainer's pass.
`sampler: hf` runs transformers' generate (rollout.generate_groups) instead: the reference this file is
tested against token for token (tests/test_sampler.py). A vLLM or SGLang backend would plug in here too:
ids and log-probs out, the adapter's weights in.
"""

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from pathvlm.generation import (completion_mask, generation_config, image_features, special_token_ids,
                                stop_token_ids)
from pathvlm.model import autocast, unwrap
from pathvlm.rollout import generate_groups


@dataclass
class Completions:
    ids: torch.Tensor  # (N, T) sampled tokens, pad id after the first stop token
    mask: torch.Tensor  # (N, T) 1 up to and including the first stop token
    truncated: torch.Tensor  # (N,) no stop token within max_new_tokens
    # (N, T) each token's log-prob under softmax(logits / T) without the special tokens (what the trainer
    # scores, top_p or not), 0 after the stop; None from sampler=hf
    logprobs: torch.Tensor | None


@torch.no_grad()
def sample(model, tokenizer, prompt: dict, features: dict | None, *, max_new_tokens: int, group_size: int = 1,
           temperature: float = 0.0, top_p: float = 1.0, sampler: str = "static",
           cuda_graph: bool = False) -> Completions:
    """B left-padded prompts (generation.encode_prompts) and their image features (generation.image_features;
    None for prompts without images) -> B*G completions, rows b*G ... b*G+G-1 from prompt b. The model
    should be in eval mode (no dropout)."""
    if sampler == "hf":
        config = generation_config(tokenizer, max_new_tokens, temperature, top_p)
        ids = generate_groups(model, prompt, features, group_size, config)[:, prompt["input_ids"].shape[1]:]
        return _ended(ids, None, tokenizer)
    ids, logprobs = static_sample(model, prompt, features, group_size, max_new_tokens, temperature, top_p,
                                  special_token_ids(tokenizer), stop_token_ids(tokenizer), tokenizer.pad_token_id,
                                  cuda_graph)
    return _ended(ids, logprobs, tokenizer)


@torch.no_grad()
def greedy(model, processor, inputs: dict, max_new_tokens: int, sampler: str = "static",
           cuda_graph: bool = False) -> tuple[Completions, list[str]]:
    """Eval's and the self-judge's answers: the arg-max token at every step, special tokens excluded,
    whatever the checkpoint's generation_config.json says -> the completions and their texts.
    inputs: generation.encode_prompts' output, with images or without."""
    tok = processor.tokenizer
    if sampler == "hf":  # transformers' generate as it is, the vision tower inside it
        with autocast(model):
            ids = model.generate(**inputs, generation_config=generation_config(tok, max_new_tokens))
        out = _ended(ids[:, inputs["input_ids"].shape[1]:], None, tok)
    else:
        features = image_features(model, inputs) if "pixel_values" in inputs else None
        out = sample(model, tok, inputs, features, max_new_tokens=max_new_tokens, cuda_graph=cuda_graph)
    return out, tok.batch_decode(out.ids, skip_special_tokens=True)


def sampler_settings(cfg, device) -> dict:
    """A config's sampler keys as sample's and greedy's arguments; cuda_graph=auto: on CUDA only."""
    graphs = device.type == "cuda" if cfg.cuda_graph == "auto" else bool(cfg.cuda_graph)
    return {"sampler": cfg.sampler, "cuda_graph": graphs}


def _ended(ids, logprobs, tokenizer) -> Completions:
    """Sampled ids -> Completions: each row ends at its first stop token; pad id after it."""
    stops = stop_token_ids(tokenizer)
    mask = completion_mask(ids, stops)
    truncated = ~torch.isin(ids, torch.tensor(stops, device=ids.device)).any(1)
    return Completions(ids.masked_fill(mask == 0, tokenizer.pad_token_id), mask, truncated, logprobs)


class _StaticKV(DynamicLayer):
    """One layer's keys/values for the whole completion, allocated once: (N, kv_heads, P + T, head_dim).
    A decode step writes its token's keys/values in place at column `index` (a one-element tensor all
    layers share) and attends to every column; the mask hides those not yet written."""

    def __init__(self, keys, values, index):
        super().__init__()
        self.keys, self.values, self.index, self.is_initialized = keys, values, index, True
        self.dtype, self.device = keys.dtype, keys.device

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self.index, key_states)
        self.values.index_copy_(2, self.index, value_states)
        return self.keys, self.values


def pick(logits, temperature: float, top_p: float, suppressed: torch.Tensor):
    """(N, V) logits -> the next token of each row and its log-prob under softmax(logits / temperature)
    without the suppressed ids (the full softmax, also with top_p < 1: what the trainer scores).
    Sampling stays on the device: argmax of p_i / E_i with E_i ~ Exp(1) picks i with probability
    p_i / sum(p) (the smallest of independent exponential clocks E_i / p_i rings first); E_i = -log U_i
    with U_i uniform, which on a CPU is twice as fast as exponential_()."""
    logits = logits.float().index_fill(-1, suppressed, float("-inf"))
    if temperature == 0:
        token, logp = logits.argmax(-1), logits.log_softmax(-1)  # greedy; log-probs of the plain model
    else:
        logp = (logits / temperature).log_softmax(-1)
        probs = logp.exp()
        if top_p < 1:  # keep the most probable tokens until their mass reaches top_p (as transformers)
            sorted_p, order = probs.sort(-1, descending=True)
            sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        token = (probs / torch.rand_like(probs).log_().neg_()).argmax(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def static_sample(model, prompt, features, group_size, max_new_tokens, temperature, top_p, suppressed, stops,
                  pad_id, cuda_graph) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (N, T) and their log-probs (N, T), T <= max_new_tokens; a row that has stopped gets pad_id
    and log-prob 0 while others go on. Stops early once every row has stopped."""
    base = unwrap(model)
    text_model, device = base.model.language_model, prompt["input_ids"].device
    G, T = group_size, max_new_tokens
    suppressed, stops = torch.tensor(suppressed, device=device), torch.tensor(stops, device=device)

    # prefill: each prompt once, at the M-RoPE positions rollout.Rows scores it with
    positions, _ = base.model.get_rope_index(prompt["input_ids"], prompt["mm_token_type_ids"],
                                             prompt.get("image_grid_thw"), attention_mask=prompt["attention_mask"])
    with autocast(model):
        images = {} if features is None else {"mm_encoder_outputs": {"image": features["image"]}}
        out = base.model(**{k: v for k, v in prompt.items() if k != "pixel_values"}, position_ids=positions,
                         use_cache=True, **images)
        first_logits = base.lm_head(out.last_hidden_state[:, -1]).repeat_interleave(G, 0)  # (N, V)
    N, P = first_logits.shape[0], prompt["input_ids"].shape[1]

    # the buffers every step reads and writes in place (fixed addresses, so a CUDA graph can replay them)
    index = torch.tensor([P], device=device)  # the cache column the next token's keys/values go to
    layers = []
    for layer in out.past_key_values.layers:
        k, v = layer.keys, layer.values  # (B, kv_heads, P, head_dim)
        keys = k.new_zeros(N, k.shape[1], P + T, k.shape[3])
        values = v.new_zeros(N, v.shape[1], P + T, v.shape[3])
        keys[:, :, :P], values[:, :, :P] = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
        layers.append(_StaticKV(keys, values, index))
    cache = Cache(layers=layers)
    del out
    allowed = torch.zeros(N, P + T, dtype=torch.bool, device=device)
    allowed[:, :P] = prompt["attention_mask"].bool().repeat_interleave(G, 0)
    position = positions.amax(dim=(0, 2)).repeat_interleave(G, 0) + 1  # (N,): text counts on from the prompt
    token, logp = pick(first_logits, temperature, top_p, suppressed)
    done = torch.isin(token, stops)  # (N,) rows that have written their stop token
    mask_of = _mask_builder(base.config._attn_implementation, layers[0].keys.dtype)

    def step():  # token t is given; write its keys/values, pick token t + 1 (under the loop's autocast)
        allowed.index_fill_(1, index, True)
        hidden = text_model(inputs_embeds=text_model.embed_tokens(token[:, None]),
                            attention_mask={"full_attention": mask_of(allowed)},
                            position_ids=position.view(1, N, 1).expand(3, N, 1), past_key_values=cache,
                            use_cache=True).last_hidden_state[:, -1]
        new_token, new_logp = pick(base.lm_head(hidden), temperature, top_p, suppressed)
        token.copy_(new_token.masked_fill(done, pad_id))
        logp.copy_(new_logp.masked_fill(done, 0.0))
        done.logical_or_(torch.isin(token, stops))
        index.add_(1)
        position.add_(1)

    ids = torch.full((N, T), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(N, T, device=device)
    with autocast(model):
        run_step = captured(step, (token, logp, done, index, position, allowed)) if cuda_graph else step
        for t in range(T):
            ids[:, t], logprobs[:, t] = token, logp
            if t + 1 == T or bool(done.all()):  # one sync a token: stop as soon as every row has
                break
            run_step()
    return ids[:, :t + 1], logprobs[:, :t + 1]


def _mask_builder(attn_implementation: str, dtype):
    """`allowed` (N, L) -> the (N, 1, 1, L) mask the attention function takes: sdpa a boolean one
    (True = attend), eager an additive one (0 or the dtype's lowest value)."""
    if attn_implementation == "sdpa":
        return lambda allowed: allowed[:, None, None, :]
    if attn_implementation == "eager":
        lowest = torch.finfo(dtype).min
        return lambda allowed: torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, lowest)[:, None, None, :]
    raise ValueError(f"sampler=static takes attn_implementation sdpa or eager, not {attn_implementation}; "
                     "use sampler=hf")


def captured(step, state: tuple):
    """`step` recorded once as a CUDA graph -> its replay: the whole decode step (every layer, the
    sampling, the buffer updates) in one launch. Recording needs two warm-up runs on a side stream, which
    change the state; it is put back after them. Where recording fails (a kernel that syncs with the host,
    as bitsandbytes 4-bit may), the step runs as it is, said in one line."""
    saved = [s.clone() for s in state]
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph.replay
    except Exception as e:  # noqa: BLE001 (any failure to record falls back to the same step, eager)
        print(f"cuda_graph: the decode step could not be recorded ({type(e).__name__}: {str(e)[:200]}); "
              "running it without a graph")
        return step
    finally:
        for s, value in zip(state, saved):
            s.copy_(value)


# ----------------------------------------------------------------------------------------------
# The sampler against the trainer, logged each GRPO step

def add_gap(gap: list, trainer_logp, sampler_logp, mask) -> list:
    """[sum of |Δ log p|, tokens, largest |Δ|] with one more micro-batch's tokens added: Δ between the
    trainer's log-probs of the sampled tokens and the sampler's own, on the same weights. Only
    numerics differ (a merged LoRA, 4-bit kernels, another attention path); TRL logs it for vLLM."""
    delta = (trainer_logp - sampler_logp).abs()[mask.bool()]
    largest = delta.max().item() if delta.numel() else 0.0
    return [gap[0] + delta.sum().item(), gap[1] + delta.numel(), max(gap[2], largest)]


def gap_metrics(gaps: list[list]) -> dict:
    """Every process's add_gap sums -> the mean |Δ log p| and the largest ratio exp(max |Δ|) of the
    two policies on one token. Empty with sampler=hf, which returns no log-probs."""
    if not gaps:
        return {}
    return {"sampler/logp_gap_mean": sum(g[0] for g in gaps) / max(1, sum(g[1] for g in gaps)),
            "sampler/ratio_max": math.exp(max(g[2] for g in gaps))}
