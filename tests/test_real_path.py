"""The 7B's path on CPU: a real-shaped checkpoint (the tiny model in an offline hub cache, under an
org/name id, with Qwen2.5-VL-7B-Instruct's generation settings) loaded by its id, as configs/*.yaml
load the 7B. Its generation_config.json must not reach sampling or evaluation."""

import json
import os

import pytest
import torch
from PIL import Image

import eval as eval_script
from pathvlm import rollout
from pathvlm.config import GRPOConfig, ModelConfig
from pathvlm.generation import (completion_mask, encode_prompts, generation_config, image_features,
                                special_token_ids, stop_token_ids)
from pathvlm.model import load_model
from pathvlm.records import image_path, load_split, prompt_messages
from pathvlm.rollout import generate_groups
from pathvlm.sampler import greedy, sample as static_sample
import train_grpo
import train_sft


def prompts(demo_data, processor, n=2, split="rl"):
    path = f"{demo_data}/{split}.jsonl"
    records = load_split(path)[:n]
    images = [Image.open(image_path(path, r)).convert("RGB") for r in records]
    return encode_prompts(processor, [prompt_messages(r) for r in records], images, "cpu")


def test_hub_id_loads_with_its_processor_and_no_generation_settings(hub_model):
    from transformers import GenerationConfig

    model, processor = load_model(ModelConfig(model=hub_model))
    shipped = GenerationConfig.from_pretrained(hub_model)
    assert shipped.repetition_penalty == 1.05 and shipped.top_k == 1  # what the checkpoint carries...
    assert model.generation_config.repetition_penalty in (None, 1.0)  # ...and what generate may inherit
    assert model.generation_config.top_k is None and model.generation_config.temperature is None
    assert processor.tokenizer.padding_side == "left"
    assert stop_token_ids(processor.tokenizer) == shipped.eos_token_id  # both EOS ids end a completion


def sampling_setup(hub_model, demo_data, temperature):
    """The hub checkpoint loaded as GRPO loads it, in eval mode, with two demo prompts and their image features."""
    cfg = GRPOConfig(model=hub_model, temperature=temperature, max_new_tokens=16, group_size=3)
    model, processor = load_model(cfg)
    model.eval()
    prompt = prompts(demo_data, processor)
    return cfg, model, processor.tokenizer, prompt, image_features(model, prompt)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_draws_from_the_policy_the_loop_scores(hub_model, demo_data, temperature):
    """log-softmax of the sampler's own processed scores, at each sampled token, equals the loop's
    log-prob pass over the same completions. The checkpoint's repetition penalty, a temperature not
    applied in the log-prob pass, or a suppressed token left in its softmax would each break it."""
    cfg, model, tok, prompt, features = sampling_setup(hub_model, demo_data, temperature)

    def sample(config):
        torch.manual_seed(0)
        out = generate_groups(model, prompt, features, cfg.group_size, config, output_scores=True,
                              return_dict_in_generate=True)
        ids = out.sequences[:, prompt["input_ids"].shape[1]:]
        mask = completion_mask(ids, stop_token_ids(tok))
        scores = torch.stack(out.scores, 1).float().log_softmax(-1)  # (N, T, V)
        sampler = scores.gather(-1, ids[..., None]).squeeze(-1) * mask
        rows = rollout.Rows(model, prompt, features, ids.masked_fill(mask == 0, tok.pad_token_id), mask,
                               cfg.group_size, temperature, special_token_ids(tok))
        with torch.no_grad():
            scored = rows.logprobs(model, 0, ids.shape[0], 1024, share_prompt=True)
        return (sampler - scored).abs().max().item(), int(mask.sum())

    diff, n_tokens = sample(generation_config(tok, cfg.max_new_tokens, temperature, cfg.top_p))
    assert n_tokens > 2 * cfg.group_size and diff < 1e-4
    # the test can fail: sampling with the checkpoint's repetition penalty (what transformers fills in
    # when it is not given) moves the sampler's log-probs away from the policy's
    from transformers import GenerationConfig

    inherited = generation_config(tok, cfg.max_new_tokens, temperature, cfg.top_p)
    inherited.repetition_penalty = GenerationConfig.from_pretrained(hub_model).repetition_penalty
    assert sample(inherited)[0] > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_static_sampler_draws_from_the_policy_the_loop_scores(hub_model, demo_data, temperature):
    """The static sampler's own log-probs (sampler.py) equal the loop's log-prob pass on the real-shaped
    checkpoint: nothing of its generation_config.json reaches the static sampler either."""
    cfg, model, tok, prompt, features = sampling_setup(hub_model, demo_data, temperature)
    torch.manual_seed(0)
    out = static_sample(model, tok, prompt, features, max_new_tokens=16, group_size=3, temperature=temperature)
    rows = rollout.Rows(model, prompt, features, out.ids, out.mask, 3, temperature, special_token_ids(tok))
    with torch.no_grad():
        scored = rows.logprobs(model, 0, out.ids.shape[0], 1024, share_prompt=True)
    assert int(out.mask.sum()) > 2 * cfg.group_size
    assert (out.logprobs - scored).abs().max().item() < 1e-5


@pytest.mark.parametrize("sampler", ["static", "hf"])
def test_eval_is_greedy_whatever_the_checkpoint_says(hub_model, demo_data, sampler):
    """Every answer token is the arg-max of the model's own logits (special tokens excluded): no
    repetition penalty, top-k or temperature from generation_config.json."""
    model, processor = load_model(ModelConfig(model=hub_model), trainable=False)
    model.eval()
    prompt = prompts(demo_data, processor, n=4, split="test")
    out, _ = greedy(model, processor, prompt, max_new_tokens=24, sampler=sampler)
    ids, mask = out.ids, out.mask
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt["input_ids"], ids], 1),
                       attention_mask=torch.cat([prompt["attention_mask"], mask], 1),
                       mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(ids)], 1),
                       pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"]).logits
    logits = logits[:, prompt["input_ids"].shape[1] - 1:-1].float()  # (N, T, V): the logits that chose each token
    logits[..., special_token_ids(processor.tokenizer)] = float("-inf")
    assert torch.equal(logits.argmax(-1)[mask.bool()], ids[mask.bool()])


def test_sft_grpo_eval_by_hub_id(hub_model, demo_data, tmp_path, capsys):
    """The paper's chain, stage by stage, with the model named by its hub id and nothing downloaded."""
    sft, grpo, evaluation = (str(tmp_path / d) for d in ("sft", "grpo", "eval"))
    train_sft.main(["configs/sft.yaml", f"model={hub_model}", f"data={demo_data}/sft.jsonl", "eval_data=null",
                    f"output_dir={sft}", "max_steps=2", "batch_size=2", "grad_accum=1", "optimizer=adamw",
                    "max_pixels=12544", "lora_r=8", "lora_alpha=16"])
    train_grpo.main(["configs/grpo.yaml", f"model={hub_model}", f"init_adapter={sft}", f"data={demo_data}/rl.jsonl",
                     f"output_dir={grpo}", "max_steps=2", "max_new_tokens=8", "optimizer=adamw", "max_pixels=12544",
                     "lora_r=8", "lora_alpha=16", "lr=1e-3"])
    eval_script.run(eval_script.parse_args(eval_script.EvalConfig, [
        "configs/eval.yaml", f"model={hub_model}", f"adapter={grpo}", f"sets=[demo={demo_data}/test.jsonl]",
        f"output_dir={evaluation}", "limit=4", "max_new_tokens=8", "max_pixels=12544"]))
    # the adapter was trained on a 4-bit base (configs/grpo.yaml), configs/eval.yaml loads it unquantised: say so
    assert "trained on a quantization=4bit base" in capsys.readouterr().out
    for out in (sft, grpo):
        with open(os.path.join(out, "adapter_config.json")) as f:
            assert json.load(f)["base_model_name_or_path"] == hub_model
    with open(os.path.join(grpo, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    with open(os.path.join(evaluation, "metrics.json")) as f:
        assert json.load(f)["sets"]["demo"]["n"] == 4


def test_device_auto_refuses_a_7b_on_the_cpu(tmp_path):
    """No GPU visible and a 7B config: a message saying why and how to insist, before any weight loads."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from gpu_grpo import arch_config

    from pathvlm.model import estimate_params, pick_device
    from pathvlm.tiny import build_tiny_tokenizer

    arch_config("7b", build_tiny_tokenizer()).save_pretrained(tmp_path)  # config.json only: no weights
    assert 0.9 < estimate_params(str(tmp_path)) / 8_292_166_656 < 1.1
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: device=auto picks it")
    with pytest.raises(SystemExit, match="no CUDA GPU is visible.*device=cpu"):
        pick_device("auto", str(tmp_path))
    assert pick_device("cpu", str(tmp_path)).type == "cpu"
