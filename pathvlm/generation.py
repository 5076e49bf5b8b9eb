"""What runs a loaded model: chat messages and images encoded as inputs, the vision tower once, the
distribution completions are drawn from, and which tokens end or may never appear in a completion.
Loading the model is model.py's; drawing the completions, sampler.py's.
"""

import torch
from transformers import GenerationConfig

from pathvlm.model import autocast, unwrap


def special_token_ids(tokenizer) -> list[int]:
    """Tokens a sampled completion must never contain: a sampled <|image_pad|> crashes the next
    forward pass (image features and image tokens no longer match)."""
    names = ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    return [tokenizer.convert_tokens_to_ids(n) for n in names]


def stop_token_ids(tokenizer) -> list[int]:
    """A completion ends at the first of these: <|im_end|> (the chat turn's end) and <|endoftext|>,
    the two EOS ids of Qwen2.5-VL-Instruct's generation_config.json."""
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]


def generation_config(tokenizer, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                      **extra) -> GenerationConfig:
    """Every setting that shapes the next-token distribution, given: temperature 0 = greedy, else
    sampling from softmax(logits / temperature) with the special tokens removed, nothing else (no
    top-k, no repetition penalty), which is the distribution completion_logprobs scores. transformers
    fills any setting left None from the model's own generation config; none is left None here."""
    sample = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1, temperature=temperature if sample else 1.0,
        top_p=top_p if sample else 1.0, top_k=0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, length_penalty=1.0,
        min_new_tokens=0, bad_words_ids=None, begin_suppress_tokens=None,  # min_new_tokens overrides min_length
        suppress_tokens=special_token_ids(tokenizer), eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **extra)


def encode_prompts(processor, messages_list, images, device):
    """Chat messages + PIL images -> left-padded model inputs: input_ids, attention_mask,
    mm_token_type_ids (1 on image tokens: M-RoPE needs it to place them), pixel_values, image_grid_thw."""
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages_list]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


def encode_completions(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Target texts (each ending with EOS) -> right-padded ids and mask, (N, T). Tokenised apart from
    the prompt so that the prompt/completion boundary is exact."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def image_features(model, inputs: dict):
    """Vision-tower output for each prompt's image, in the form generate and forward accept as
    `mm_encoder_outputs`. The tower is frozen and LoRA sits on the language model only, so these
    features are the same for the sampling, old, reference and policy passes: computed once per step."""
    with autocast(model):
        out = unwrap(model).model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                     return_dict=True)
    return {"image": out}


def completion_mask(completion_ids: torch.Tensor, eos_id: int | list[int]) -> torch.Tensor:
    """1 for tokens up to and including the first EOS (any of the ids), 0 after it. (N, T) -> (N, T) long."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_id, device=completion_ids.device))
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion_ids.shape[1])
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    return (positions[None, :] <= first_eos[:, None]).long()
