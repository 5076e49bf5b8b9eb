"""The embedded tiny Qwen2.5-VL goes through the same code as the 7B: build, save/load, processor,
LoRA placement, 4-bit loading, generation."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from pathvlm.config import ModelConfig
from pathvlm.generation import completion_mask, encode_prompts
from pathvlm.model import LORA_TARGET, load_model, load_processor
from pathvlm.records import Record, prompt_messages
from pathvlm.sampler import greedy
from pathvlm.tiny import build_tiny_model, resolve_model_path

RECORD = Record("r", "a.png", "Which stain dominates this patch?", ["brown", "blue", "mixed"], "A")


def image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_tiny_is_deterministic_and_round_trips_exactly(tmp_path):
    torch.manual_seed(123)
    caller_rng = torch.get_rng_state()
    model_a, tok = build_tiny_model("tiny", seed=3)
    # building it leaves the caller's RNG alone: a run draws the same whether or not the model was cached
    assert torch.equal(torch.get_rng_state(), caller_rng)
    model_b, _ = build_tiny_model("tiny", seed=3)
    model_c, _ = build_tiny_model("tiny", seed=4)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["lm_head.weight"], model_c.state_dict()["lm_head.weight"])

    model_a.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = ModelConfig(model=str(tmp_path))
    loaded, processor = load_model(cfg, lora=False, trainable=False)
    inputs = encode_prompts(processor, [prompt_messages(RECORD)], [image(112, 112)], "cpu")
    with torch.no_grad():
        assert torch.equal(model_a.eval()(**inputs).logits, loaded.eval()(**inputs).logits)


def test_chat_template_is_qwen_format():
    processor = load_processor(resolve_model_path("tiny"), 56 * 56, 112 * 112)
    text = processor.apply_chat_template(prompt_messages(RECORD), tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|><|vision_end|>Which stain")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("h,w", [(56, 56), (112, 112), (100, 60), (300, 200), (37, 500)])
def test_image_tokens_match_image_features(h, w):
    model, processor = load_model(ModelConfig(), trainable=False)
    inputs = encode_prompts(processor, [prompt_messages(RECORD)], [image(h, w)], "cpu")
    n_tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
    merge = processor.image_processor.merge_size
    assert n_tokens == int(inputs["image_grid_thw"].prod()) // merge ** 2
    with torch.no_grad():
        feats = model.get_base_model().model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        model(**inputs)  # raises if features and tokens disagree
    assert feats.pooler_output[0].shape[0] == n_tokens
    assert 56 * 56 <= int(inputs["image_grid_thw"][0, 1:].prod()) * 14 * 14 <= 112 * 112 * 1.3


def test_lora_only_on_language_model_and_vision_frozen():
    model, _ = load_model(ModelConfig())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
    assert not any("visual" in n for n in trainable)
    # the vision blocks do have modules with the same names: they must be untouched
    assert any(re.search(r"visual\.blocks\.\d+\.mlp\.gate_proj$", n) for n, _ in model.named_modules())
    assert not any("visual" in n and "lora" in n for n, _ in model.named_modules())
    assert re.fullmatch(LORA_TARGET, "model.language_model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("sampler", ["static", "hf"])
def test_left_padded_batched_generation(sampler):
    model, processor = load_model(ModelConfig(), trainable=False)
    short = Record("s", "a.png", "Dominant stain?", ["a", "b"], "A")
    inputs = encode_prompts(processor, [prompt_messages(RECORD), prompt_messages(short)], [image(56, 56), image(56, 56, 1)],
                            "cpu")
    assert inputs["attention_mask"][1, 0] == 0 and inputs["attention_mask"][:, -1].all()  # padding on the left
    out, texts = greedy(model, processor, inputs, max_new_tokens=6, sampler=sampler)
    single = encode_prompts(processor, [prompt_messages(short)], [image(56, 56, 1)], "cpu")
    alone, _ = greedy(model, processor, single, max_new_tokens=6, sampler=sampler)
    assert torch.equal(out.ids[1, :alone.ids.shape[1]], alone.ids[0])  # padding does not change the answer
    assert len(texts) == 2


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 9, 7, 9], [5, 5, 5, 5, 5]])
    assert completion_mask(ids, eos_id=9).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_4bit_load_on_cpu_trains():
    cfg = ModelConfig(quantization="4bit", gradient_checkpointing=True)
    model, processor = load_model(cfg)
    import bitsandbytes as bnb
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(".language_model." in n for n in quantized)
    assert not any("visual" in n or "lm_head" in n for n in quantized)
    inputs = encode_prompts(processor, [prompt_messages(RECORD)], [image(56, 56)], "cpu")
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_missing_model_dir_is_named(tmp_path):
    with pytest.raises((FileNotFoundError, OSError), match="nope"):
        load_model(ModelConfig(model=str(tmp_path / "nope")))


def test_unsloth_backend_without_gpu_is_one_clear_error():
    with pytest.raises(SystemExit, match="backend=unsloth needs a CUDA GPU"):
        load_model(ModelConfig(backend="unsloth"))


def test_group_generation_with_shared_prefill_matches_plain_generate():
    from pathvlm.generation import generation_config, image_features
    from pathvlm.rollout import generate_groups

    model, processor = load_model(ModelConfig(), trainable=False)
    model.eval()
    records = [RECORD, Record("s", "a.png", "Dominant stain?", ["a", "b"], "A")]
    inputs = encode_prompts(processor, [prompt_messages(r) for r in records], [image(56, 56), image(84, 56, 1)], "cpu")
    config = generation_config(processor.tokenizer, max_new_tokens=10, temperature=1.0)
    torch.manual_seed(0)
    plain = model.generate(**inputs, generation_config=config, num_return_sequences=3)
    torch.manual_seed(0)
    shared = generate_groups(model, inputs, image_features(model, inputs), 3, config)
    assert torch.equal(plain, shared)


def test_4bit_training_survives_eval_passes_on_avx512_bf16_cpus(monkeypatch):
    """bitsandbytes decides from the CPU's flags, when a Linear4bit is built, whether an eval-mode no-grad
    forward repacks its weight for an inference-only kernel. Claim the flag on any machine (as a recent
    Xeon or Zen 4 sets it), then: policy gradients, sampling and a no-grad pass in eval mode, gradients
    again. They must be the same (without load_model's fix the second backward fails, or differs)."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    model, processor = load_model(ModelConfig(quantization="4bit"))
    inputs = encode_prompts(processor, [prompt_messages(RECORD)], [image(56, 56)], "cpu")

    def lora_grads():
        model.train()
        model.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    before = lora_grads()
    model.eval()
    with torch.no_grad():
        model(**inputs)
    greedy(model, processor, inputs, max_new_tokens=4)
    after = lora_grads()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
