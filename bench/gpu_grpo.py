"""GPU benchmark: GRPO steps of Qwen2.5-VL-7B / 3B with random weights, QLoRA, the paper's lengths.

    python bench/gpu_grpo.py --arch 7b                   # our loop: s/step, phases, tokens/s, peak memory
    python bench/gpu_grpo.py --arch 7b --trl             # ... and TRL's GRPOTrainer on the same work
    python bench/gpu_grpo.py --arch 7b --sft             # ... and peak memory of one SFT step
    python bench/gpu_grpo.py --arch 3b --trl --sft
    python bench/gpu_grpo.py --arch tiny --steps 2       # the same code on CPU in seconds (tests/test_bench.py)

The model has the real architecture (layer sizes from the public configs, in ARCHS below) and random
weights: nothing is downloaded. It is built once in bf16 on the GPU (7B: 16.6 GB), saved in 2 GB
shards under --workdir, and from then on loaded by our own `model.load_model` with 4-bit NF4
quantisation, exactly as a real checkpoint would be. The tokenizer is the embedded tiny one (a few
hundred tokens, the Qwen special tokens among them) while the config keeps the real vocabulary
(152,064 / 151,936 rows): the special-token ids in the config are read from that tokenizer, as
model.tiny_config does, so image tokens line up; sampled ids the tokenizer does not know decode to
nothing, which only the (here meaningless) rewards see.

The work of one step follows configs/grpo.yaml: 2 prompts x G=4, each prompt one 448-px image
(256 image tokens) and a question padded to ~1,024 prompt tokens in all, 1,024 new tokens per
completion with EOS unsampleable (the model's generation config sets min_new_tokens, so every
completion is full length), LoRA r=64 on the language model, 4-bit base, gradient checkpointing,
micro-batches of 4, paged 8-bit AdamW, reference = the base with the adapter disabled (β = 0.04).

Ours is train_grpo.main itself, on a synthetic JSONL; phases are timed by wrapping two of its helpers
(common.patched): generation = train_grpo.sample_groups, log-prob = train_grpo.logprobs_no_grad
(the reference pass), backward = the rest of the step (vision features, the policy forward and
backward under checkpointing, the optimizer step). TRL (--trl): GRPOTrainer with the same model
directory, processor, LoRA, lengths and settings (common.make_trl_grpo_trainer); generation =
_generate_single_turn, log-prob = the rest of _generate_and_score_completions (prompt processing,
reference log-probs, rewards), backward = the rest of the step. Peak memory is
torch.cuda.max_memory_allocated, reset before each run (on CPU: the process's peak RSS, which cannot
be reset). The first --warmup steps (CUDA kernel selection, allocator growth) are left out of s/step.
"""

import argparse
import gc
import json
import os
import sys
import tempfile
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOT, PhaseTimer, cuda_sync, load_plain_model, make_trl_grpo_trainer, median,  # noqa: E402
                    patched, print_table, read_metrics, step_end_callback, timed, trl_grpo_dataset)

from model import SPECIAL_TOKENS, build_tiny_tokenizer, cache_dir, load_processor  # noqa: E402

# Text: hidden, layers, heads, kv heads, mlp, vocab, tied embeddings, M-RoPE sections (sum = head_dim/2).
# Vision: depth, hidden, mlp, heads, full-attention blocks (windowed elsewhere). From the public configs.
ARCHS = {
    "7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, mlp=18944, vocab=152064, tied=False,
               mrope=[16, 24, 24], v_depth=32, v_hidden=1280, v_mlp=3420, v_heads=16, v_full=[7, 15, 23, 31]),
    "3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2, mlp=11008, vocab=151936, tied=True,
               mrope=[16, 24, 24], v_depth=32, v_hidden=1280, v_mlp=3420, v_heads=16, v_full=[7, 15, 23, 31]),
    # model.TINY_SIZES["tiny"] with a vocabulary larger than the tokenizer's, as the real ones are
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, vocab=1024, tied=False,
                 mrope=[2, 3, 3], v_depth=2, v_hidden=64, v_mlp=128, v_heads=4, v_full=[1]),
}
# Per-arch defaults of the work: image side (px), prompt tokens in all, new tokens, steps
WORK = {"7b": (448, 1024, 1024, 3), "3b": (448, 1024, 1024, 3), "tiny": (56, 192, 16, 2)}
MAX_PIXELS = 401408  # configs/grpo.yaml: at most 512 image tokens
NUM_PROMPTS, GROUP_SIZE, MICRO_BATCH = 2, 4, 4  # configs/grpo.yaml
LORA_R, LORA_ALPHA, LR, BETA = 64, 128, 1e-6, 0.04  # configs/grpo.yaml


def arch_config(arch: str, tokenizer):
    from transformers import Qwen2_5_VLConfig

    a = ARCHS[arch]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["mlp"], num_hidden_layers=a["layers"],
            num_attention_heads=a["heads"], num_key_value_heads=a["kv_heads"], max_position_embeddings=128000,
            rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=a["mrope"]),
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=a["tied"]),
        vision_config=dict(
            depth=a["v_depth"], hidden_size=a["v_hidden"], intermediate_size=a["v_mlp"], num_heads=a["v_heads"],
            out_hidden_size=a["hidden"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=a["v_full"], tokens_per_second=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=a["tied"])


def random_model_dir(arch: str, workdir: str, new_tokens: int) -> str:
    """Build the random-weight model once (bf16, on the GPU if there is one: no 16 GB of CPU init),
    save it in shards; at every call set min_new_tokens = new_tokens in its generation config."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    path = os.path.join(workdir, f"random-qwen2.5-vl-{arch}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        tokenizer = build_tiny_tokenizer()
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(arch_config(arch, tokenizer), dtype=torch.bfloat16)
        print(f"built random {arch}: {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"saving to {path}")
        tmp = f"{path}.tmp{os.getpid()}"
        model.save_pretrained(tmp, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    generation = GenerationConfig.from_pretrained(path)
    generation.min_new_tokens = new_tokens  # EOS cannot be sampled: every completion is new_tokens long
    generation.save_pretrained(path)
    return path


def write_synthetic_data(out_dir: str, model_dir: str, image_px: int, prompt_tokens: int) -> tuple[str, int]:
    """A JSONL of identical records: one random image and a stain question padded with on-topic
    words to ~prompt_tokens (image tokens included). Returns (path, prompt tokens per record)."""
    from mcq import TRAINING_WORDS, Record
    from train_sft import example_length

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(out_dir, "images", "bench.png"))
    path = os.path.join(out_dir, "bench.jsonl")
    processor = load_processor(model_dir, 56 * 56, MAX_PIXELS)

    def record(question: str, i: int = 0) -> Record:
        return Record(id=f"bench-{i}", image="images/bench.png", question=question, options=["brown", "blue", "mixed"],
                      answer="A", explanation=" ".join(TRAINING_WORDS[8:11]), source="bench")

    def length(question: str) -> int:
        with open(path, "w") as f:
            f.write(json.dumps(asdict(record(question))) + "\n")
        return example_length(processor, record(question), path, with_target=False)

    question, filler = "Which stain dominates this patch?", " " + TRAINING_WORDS[-1]
    n_base, n_one = length(question), length(question + filler) - length(question)
    question += filler * max(0, (prompt_tokens - n_base) // n_one)
    n_tokens = length(question)
    with open(path, "w") as f:
        for i in range(8):
            f.write(json.dumps(asdict(record(question, i))) + "\n")
    return path, n_tokens


def peak_reset():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def run_ours(model_dir, data, prompt_tokens, new_tokens, steps, out_dir) -> dict:
    import train_grpo

    generate_s, logprob_s = [], []
    peak_reset()
    with patched(train_grpo, "sample_groups", lambda fn: timed(fn, generate_s, cuda_sync)), \
            patched(train_grpo, "logprobs_no_grad", lambda fn: timed(fn, logprob_s, cuda_sync)):
        train_grpo.main([
            os.path.join(ROOT, "configs/grpo.yaml"), f"model={model_dir}", f"output_dir={out_dir}", f"data={data}",
            "init_adapter=null", "reference=base", f"kl_coef={BETA}", f"num_prompts={NUM_PROMPTS}",
            f"group_size={GROUP_SIZE}", f"micro_batch_size={MICRO_BATCH}", f"max_prompt_len={prompt_tokens}",
            f"max_new_tokens={new_tokens}", f"max_pixels={MAX_PIXELS}", f"lora_r={LORA_R}", f"lora_alpha={LORA_ALPHA}",
            "quantization=4bit", "gradient_checkpointing=true", f"max_steps={steps}", "save_every=0", "sample_every=0",
            "seed=0", "resume=none", "loss_type=grpo", "num_iterations=1",
            # paged 8-bit AdamW is a CUDA optimizer; on CPU (--arch tiny) plain AdamW
            f"optimizer={'paged_adamw_8bit' if torch.cuda.is_available() else 'adamw'}"])
    rows = read_metrics(out_dir)
    n = NUM_PROMPTS * GROUP_SIZE
    return {"steps": [{"step_s": r["step_s"], "generation_s": g, "logprob_s": lp, "backward_s": r["step_s"] - g - lp,
                       "completion_len": r["completion_len_mean"],
                       "gen_tokens_per_s": r["completion_len_mean"] * n / g}
                      for r, g, lp in zip(rows, generate_s, logprob_s)],
            "peak_gib": max(r["peak_mem_gib"] for r in rows)}


def run_trl(model_dir, data, new_tokens, steps, out_dir) -> dict:
    peak_reset()
    model, processor = load_plain_model(model_dir, quantization="4bit", max_pixels=MAX_PIXELS)
    lengths = []
    trainer = make_trl_grpo_trainer(
        model, processor, trl_grpo_dataset(data), out_dir, num_prompts=NUM_PROMPTS, group_size=GROUP_SIZE,
        max_new_tokens=new_tokens, max_steps=steps, lr=LR, beta=BETA, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
        loss_type="grpo", seed=0, bf16=torch.cuda.is_available(), gradient_checkpointing=True,
        micro_batch_size=MICRO_BATCH, completion_lengths=lengths,
        optim="paged_adamw_8bit" if torch.cuda.is_available() else "adamw_torch")
    ends, phases = step_end_callback(), PhaseTimer(trainer)
    trainer.add_callback(ends)
    trainer.train()
    n = NUM_PROMPTS * GROUP_SIZE
    out = []
    for i, (step, gen, rollout) in enumerate(zip(ends.step_seconds(), phases.generate_s, phases.rollout_s)):
        length = sum(lengths[i * n:(i + 1) * n]) / n
        out.append({"step_s": step, "generation_s": gen, "logprob_s": rollout - gen, "backward_s": step - rollout,
                    "completion_len": length, "gen_tokens_per_s": length * n / gen})
    peak = peak_gib()
    del trainer, model
    return {"steps": out, "peak_gib": peak}


def run_sft_step(model_dir, data, prompt_tokens, out_dir) -> float:
    """Peak memory of one optimizer step of train_sft.main with configs/sft.yaml (micro-batch 2,
    QLoRA r=64, checkpointing); grad_accum=1, as further micro-batches repeat the same peak."""
    import train_sft

    peak_reset()
    train_sft.main([os.path.join(ROOT, "configs/sft.yaml"), f"model={model_dir}", f"output_dir={out_dir}",
                    f"data={data}", "eval_data=null", "max_steps=1", "grad_accum=1", "save_every=0", "resume=none",
                    f"max_pixels={MAX_PIXELS}", f"max_len={prompt_tokens + 256}",
                    f"optimizer={'paged_adamw_8bit' if torch.cuda.is_available() else 'adamw'}"])
    return peak_gib()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=list(ARCHS), default="7b")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per run (default: 3; tiny 2)")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of s/step")
    p.add_argument("--image-px", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length, image tokens included")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--trl", action="store_true", help="also run TRL's GRPOTrainer (requirements-bench.txt)")
    p.add_argument("--sft", action="store_true", help="also measure the peak memory of one SFT step")
    p.add_argument("--workdir", default=os.path.join(cache_dir(), "bench"), help="where the random weights are kept")
    args = p.parse_args(argv)
    image_px, prompt_tokens, new_tokens, steps = WORK[args.arch]
    image_px, prompt_tokens = args.image_px or image_px, args.prompt_tokens or prompt_tokens
    new_tokens, steps = args.new_tokens or new_tokens, args.steps or steps
    warmup = args.warmup if steps > args.warmup else 0
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # see bench/sft_vs_trl.py: one thread is faster and steadier on a busy CPU

    model_dir = random_model_dir(args.arch, args.workdir, new_tokens)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        data, n_prompt = write_synthetic_data(os.path.join(tmp, "data"), model_dir, image_px, prompt_tokens)
        results["ours"] = run_ours(model_dir, data, n_prompt, new_tokens, steps, os.path.join(tmp, "ours"))
        if args.trl:
            results["TRL"] = run_trl(model_dir, data, new_tokens, steps, os.path.join(tmp, "trl"))
        sft_peak = run_sft_step(model_dir, data, n_prompt, os.path.join(tmp, "sft")) if args.sft else None

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (1 thread)"
    memory = "peak GPU memory allocated (GiB)" if torch.cuda.is_available() else "peak memory, process RSS (GiB)"
    print(f"\nGRPO step, Qwen2.5-VL-{args.arch} architecture with random weights, 4-bit QLoRA r={LORA_R}, "
          f"gradient checkpointing, on {device}")
    print(f"{NUM_PROMPTS} prompts x G={GROUP_SIZE}: prompt {n_prompt} tokens ({image_px}-px image), {new_tokens} new "
          f"tokens (EOS ignored); micro-batch {MICRO_BATCH}; steps {warmup + 1}..{steps} measured")

    def row(label, key):
        return (label, *[median(s[key] for s in r["steps"][warmup:]) for r in results.values()])

    print_table([row("s/step (median)", "step_s"), row("  generation", "generation_s"),
                 row("  log-prob (reference, no grad)", "logprob_s"),
                 row("  backward (policy fwd+bwd, optimizer)", "backward_s"),
                 row("generation tokens/s", "gen_tokens_per_s"), row("completion tokens (mean)", "completion_len"),
                 (memory, *[r["peak_gib"] for r in results.values()])],
                header=("", *results))
    if args.trl:
        ratio = median(s["step_s"] for s in results["ours"]["steps"][warmup:]) / \
            median(s["step_s"] for s in results["TRL"]["steps"][warmup:])
        print(f"ours / TRL seconds per step = {ratio:.3f} (lower is better for us)")
    if sft_peak is not None:
        print(f"SFT step (configs/sft.yaml: micro-batch 2, QLoRA r=64, checkpointing): {memory} = {sft_peak:.2f}")


if __name__ == "__main__":
    main()
