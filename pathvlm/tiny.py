"""The embedded tiny Qwen2.5-VL: the real architecture (M-RoPE, windowed vision attention, the 2x2 patch
merger) and the real chat template, random weights, and a byte-level BPE tokenizer trained on this
project's own vocabulary. `resolve_model_path("tiny")` builds it once per seed into a cache directory;
from then on model.load_model loads it with `from_pretrained`, exactly as it loads the 7B.
"""

import os

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# The Qwen2.5-VL chat format, for the tiny tokenizer (real checkpoints bring their own template):
# <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>text<|im_end|>\n
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m.role != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}"
    "{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------------------------
# Sizes, tokenizer, config, weights

TINY_SIZES = {
    # text hidden / layers / heads / kv heads / mlp;  vision hidden / depth / heads / mlp
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, v_hidden=64, v_depth=2, v_heads=4, v_mlp=128),
    "tiny-small": dict(hidden=128, layers=4, heads=4, kv_heads=2, mlp=256, v_hidden=128, v_depth=4, v_heads=4,
                       v_mlp=256),
}


def tiny_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the prompt/answer vocabulary of this project, so the
    demo's sequences are a few dozen tokens rather than one token per byte."""
    from pathvlm.records import TRAINING_WORDS, format_prompt_text

    example = format_prompt_text("Which stain dominates this patch?", ["brown", "blue", "mixed"])
    return [example] * 50 + TRAINING_WORDS


def build_tiny_tokenizer(vocab_size: int = 640) -> Qwen2TokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, additional_special_tokens=SPECIAL_TOKENS[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def qwen25vl_config(tokenizer, *, hidden, layers, heads, kv_heads, mlp, vocab, tied, mrope, v_depth, v_hidden,
                    v_mlp, v_heads, v_full, max_positions, norm_eps, tokens_per_second) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of these sizes (text: hidden, layers, heads, kv heads, mlp, vocab, tied
    embeddings, M-RoPE sections; vision: depth, hidden, mlp, heads, full-attention blocks, windowed
    elsewhere) whose special-token ids are the tokenizer's, so its image tokens line up."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
            rms_norm_eps=norm_eps, rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=mrope),
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=tied),
        vision_config=dict(
            depth=v_depth, hidden_size=v_hidden, intermediate_size=v_mlp, num_heads=v_heads, out_hidden_size=hidden,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=v_full,
            tokens_per_second=tokens_per_second),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tied)


def tiny_config(tokenizer, size: str = "tiny") -> Qwen2_5_VLConfig:
    s = TINY_SIZES[size]
    half = s["hidden"] // s["heads"] // 2
    # M-RoPE splits head_dim/2 rotary frequencies over (time, height, width); the 7B uses [16, 24, 24]
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    # norm_eps and tokens_per_second (video only) are transformers' defaults, which the tiny models have always had
    return qwen25vl_config(tokenizer, **s, vocab=len(tokenizer), tied=False, mrope=mrope, v_full=[s["v_depth"] - 1],
                           max_positions=4096, norm_eps=1e-5, tokens_per_second=4)


def build_tiny_model(size: str = "tiny", seed: int = 0):
    """A random-init tiny Qwen2.5-VL and its tokenizer; the same seed gives the same weights."""
    tokenizer = build_tiny_tokenizer()
    # a private RNG stream: a run that builds the model first must draw the same LoRA init and samples
    # as one that finds it cached
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, size))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def cache_dir() -> str:
    return os.environ.get("PATHVLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pathvlm-r1"))


def tiny_path(name: str, seed: int) -> str:
    return os.path.join(cache_dir(), f"{name}-seed{seed}")


def resolve_model_path(name: str, seed: int = 0) -> str:
    """`tiny`/`tiny-small` -> a directory holding it (built once per seed); anything else unchanged."""
    if name not in TINY_SIZES:
        return name
    path = tiny_path(name, seed)
    if not os.path.isfile(os.path.join(path, "config.json")):
        model, tokenizer = build_tiny_model(name, seed)
        tmp = f"{path}.tmp{os.getpid()}"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.replace(tmp, path)  # atomic: a concurrent builder of the same seed wrote the same bytes
        except OSError:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return path
