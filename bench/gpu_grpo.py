"""GPU benchmark: GRPO steps of Qwen2.5-VL-7B / 3B with random weights, QLoRA, the paper's lengths.

    python bench/gpu_grpo.py --arch 7b --runs sft --json runs/bench/7b-sft.json       # build + load + 20 SFT steps
    python bench/gpu_grpo.py --arch 7b --runs hf --json runs/bench/7b-hf.json         # GRPO, transformers' generate
    python bench/gpu_grpo.py --arch 7b --runs static --json runs/bench/7b-static.json # GRPO, sampler.py
    python bench/gpu_grpo.py --arch 7b --runs graph --json runs/bench/7b-graph.json   # ... its step as a CUDA graph
    python bench/gpu_grpo.py --arch 7b --runs trl --json runs/bench/7b-trl.json       # TRL's GRPOTrainer
    python bench/gpu_grpo.py --table runs/bench/*.json     # the bench/README.md table from saved results
    python bench/gpu_grpo.py --arch tiny --steps 2 --runs hf static graph sft   # all of it on CPU in a minute
    python bench/gpu_grpo.py --model Qwen/Qwen2.5-VL-7B-Instruct --runs static sft   # the real checkpoint, by hub id

Each part is one call that fits in 10 minutes on one H100 (by estimate: the 7B's GRPO parts are 3 steps of
2 x 4 completions of 1,024 tokens); bench/gpu_parts.sh runs them all, 3B then 7B, each into its JSON.

The model has the real architecture (layer sizes from the public configs, in ARCHS below) and random
weights: nothing is downloaded. It is built once in bf16 on the GPU (7B: 16.6 GB), saved in 2 GB
shards under --workdir, and from then on loaded by our own `model.load_model` with 4-bit NF4
quantisation, exactly as a real checkpoint would be. The tokenizer is the embedded tiny one (a few
hundred tokens, the Qwen special tokens among them) while the config keeps the real vocabulary
(152,064 / 151,936 rows): tiny.qwen25vl_config, which builds the tiny models' configs too, reads the
special-token ids from that tokenizer, so image tokens line up; sampled ids the tokenizer does not know
decode to nothing, which only the (here meaningless) rewards see.

The work of one step follows configs/grpo.yaml: 2 prompts x G=4, each prompt one 448-px image
(256 image tokens) and a question padded to ~1,024 prompt tokens in all, 1,024 new tokens per
completion with EOS unsampleable (common.full_length sets min_new_tokens, so every completion is
full length), LoRA r=64 on the language model, 4-bit base, gradient checkpointing,
micro-batches of 4, paged 8-bit AdamW, reference = the base with the adapter disabled (β = 0.04).

Ours is train_grpo.main itself, on a synthetic JSONL, with each sampler: `hf` (transformers' generate,
one shared prefill per group), `static` (sampler.py, cuda_graph=false) and `graph` (sampler.py with its decode
step recorded as a CUDA graph; where recording fails, e.g. on bitsandbytes 4-bit kernels, it says so in
one line and the part measures the static sampler again). Phases are timed by wrapping two of its helpers
(common.patched): generation = train_grpo.sample_groups (s/token = its seconds / completion length),
log-prob = train_grpo.logprobs_no_grad
(the reference pass), backward = the rest of the step (vision features, the policy forward and
backward under checkpointing, the optimizer step). TRL (--runs trl): GRPOTrainer with the same model
directory, processor, LoRA, lengths and settings (common.make_trl_grpo_trainer); generation =
_generate_single_turn, log-prob = the rest of _generate_and_score_completions (prompt processing,
reference log-probs, rewards), backward = the rest of the step. The first --warmup steps (CUDA kernel
selection, allocator growth) are left out of s/step.

Memory, reset before each run: peak *allocated* (torch.cuda.max_memory_allocated: what the tensors
needed) and peak *reserved* (max_memory_reserved: what PyTorch's caching allocator held, which is what
must fit on the card, plus ~0.5 GiB of CUDA context); `weights` is what was allocated right after the
model was loaded (ours with its LoRA attached; TRL attaches its own later). On CPU all three are the
process's peak RSS, which cannot be reset.

On a machine that limits the length of one command, run one part per call with `--json`: each file holds
its part's figures as soon as the part ends, with the GPU's name and the library versions, and `--table`
prints the bench/README.md table from any number of them. The SFT part: 20 steps of configs/sft.yaml's
work (micro-batch 2, QLoRA r=64, checkpointing), its load time, s/step and peak memory.
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOT, cuda_sync, full_length, load_plain_model, make_trl_grpo_trainer, median, patched,  # noqa: E402
                    print_table, read_metrics, timed, train_trl_timed, trl_grpo_dataset)

from pathvlm.model import load_processor  # noqa: E402
from pathvlm.tiny import build_tiny_tokenizer, cache_dir, qwen25vl_config  # noqa: E402

# tiny.qwen25vl_config's sizes, from the public configs (M-RoPE sections sum to head_dim/2)
ARCHS = {
    "7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, mlp=18944, vocab=152064, tied=False,
               mrope=[16, 24, 24], v_depth=32, v_hidden=1280, v_mlp=3420, v_heads=16, v_full=[7, 15, 23, 31]),
    "3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2, mlp=11008, vocab=151936, tied=True,
               mrope=[16, 24, 24], v_depth=32, v_hidden=1280, v_mlp=3420, v_heads=16, v_full=[7, 15, 23, 31]),
    # tiny.TINY_SIZES["tiny"] with a vocabulary larger than the tokenizer's, as the real ones are
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, vocab=1024, tied=False,
                 mrope=[2, 3, 3], v_depth=2, v_hidden=64, v_mlp=128, v_heads=4, v_full=[1]),
}
# Per-arch defaults of the work: image side (px), prompt tokens in all, new tokens, steps
WORK = {"7b": (448, 1024, 1024, 3), "3b": (448, 1024, 1024, 3), "tiny": (56, 192, 16, 2)}
MAX_PIXELS = 401408  # configs/grpo.yaml: at most 512 image tokens
NUM_PROMPTS, GROUP_SIZE, MICRO_BATCH = 2, 4, 4  # configs/grpo.yaml
LORA_R, LORA_ALPHA, LR, BETA = 64, 128, 1e-6, 0.04  # configs/grpo.yaml


def arch_config(arch: str, tokenizer):
    return qwen25vl_config(tokenizer, **ARCHS[arch], max_positions=128000, norm_eps=1e-6, tokens_per_second=2)


def random_model_dir(arch: str, workdir: str) -> str:
    """Build the random-weight model once (bf16, on the GPU if there is one: no 16 GB of CPU init) and
    save it in shards."""
    from transformers import Qwen2_5_VLForConditionalGeneration

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
    return path


def write_synthetic_data(out_dir: str, model_dir: str, image_px: int, prompt_tokens: int) -> tuple[str, int]:
    """A JSONL of identical records: one random image and a stain question padded with on-topic
    words to ~prompt_tokens (image tokens included). Returns (path, prompt tokens per record)."""
    from pathvlm.records import TRAINING_WORDS, Record
    from pathvlm.training import example_length

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


def versions() -> dict:
    """What the figures depend on besides the code: the libraries, CUDA, the driver's GPU."""
    import importlib.metadata

    found = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft", "bitsandbytes")}
    return {**found, "cuda": torch.version.cuda, "python": sys.version.split()[0]}


def peak_reset():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory_gib(kind: str) -> float:
    """kind: 'allocated' (now), 'peak' (max allocated) or 'reserved' (max reserved). CPU: peak RSS."""
    if torch.cuda.is_available():
        read = {"allocated": torch.cuda.memory_allocated, "peak": torch.cuda.max_memory_allocated,
                "reserved": torch.cuda.max_memory_reserved}[kind]
        return read() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def after_load(fn, out: dict):
    """fn (a model loader), recording the load's seconds and the memory the weights take."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        cuda_sync()
        out.update(load_s=time.perf_counter() - t0, weights_gib=memory_gib("allocated"))
        return result
    return wrapper


# --runs name -> train_grpo's sampler keys
SAMPLERS = {"hf": ["sampler=hf"], "static": ["sampler=static", "cuda_graph=false"],
            "graph": ["sampler=static", "cuda_graph=true"]}


def run_ours(model_dir, data, prompt_tokens, new_tokens, steps, out_dir, sampler: str) -> dict:
    import train_grpo

    generate_s, logprob_s, loaded = [], [], {}
    peak_reset()
    with patched(train_grpo, "sample_groups", lambda fn: timed(fn, generate_s, cuda_sync)), \
            patched(train_grpo, "logprobs_no_grad", lambda fn: timed(fn, logprob_s, cuda_sync)), \
            patched(train_grpo, "load_model", lambda fn: after_load(fn, loaded)), full_length():
        train_grpo.main([
            os.path.join(ROOT, "configs/grpo.yaml"), f"model={model_dir}", f"output_dir={out_dir}", f"data={data}",
            *SAMPLERS[sampler],
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
                       "completion_len": r["completion_len_mean"], "s_per_token": g / r["completion_len_max"],
                       "gen_tokens_per_s": r["completion_len_mean"] * n / g}
                      for r, g, lp in zip(rows, generate_s, logprob_s)],
            "peak_gib": max(r["peak_mem_gib"] for r in rows), "reserved_gib": memory_gib("reserved"), **loaded}


def run_trl(model_dir, data, new_tokens, steps, out_dir) -> dict:
    peak_reset()
    loaded = {}
    model, processor = after_load(load_plain_model, loaded)(model_dir, quantization="4bit", max_pixels=MAX_PIXELS)
    lengths = []
    trainer = make_trl_grpo_trainer(
        model, processor, trl_grpo_dataset(data), out_dir, num_prompts=NUM_PROMPTS, group_size=GROUP_SIZE,
        max_new_tokens=new_tokens, max_steps=steps, lr=LR, beta=BETA, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
        loss_type="grpo", seed=0, bf16=torch.cuda.is_available(), gradient_checkpointing=True,
        micro_batch_size=MICRO_BATCH, completion_lengths=lengths,
        optim="paged_adamw_8bit" if torch.cuda.is_available() else "adamw_torch")
    n = NUM_PROMPTS * GROUP_SIZE
    out = [{**r, "logprob_s": r["rollout_s"] - r["generation_s"], "backward_s": r["step_s"] - r["rollout_s"],
            "s_per_token": r["generation_s"] / r["completion_len"],
            "gen_tokens_per_s": r["completion_len"] * n / r["generation_s"]}
           for r in train_trl_timed(trainer, lengths, n)]
    result = {"steps": out, "peak_gib": memory_gib("peak"), "reserved_gib": memory_gib("reserved"), **loaded}
    del trainer, model
    return result


def run_sft(model_dir, data, prompt_tokens, out_dir, steps: int) -> dict:
    """`steps` optimizer steps of train_sft.main with configs/sft.yaml (micro-batch 2, QLoRA r=64,
    checkpointing; grad_accum=1, as further micro-batches repeat the same peak): load time, s/step
    (median after the first), peak memory."""
    import train_sft

    peak_reset()
    loaded = {}
    with patched(train_sft, "load_model", lambda fn: after_load(fn, loaded)):
        train_sft.main([os.path.join(ROOT, "configs/sft.yaml"), f"model={model_dir}", f"output_dir={out_dir}",
                        f"data={data}", "eval_data=null", f"max_steps={steps}", "grad_accum=1", "save_every=0",
                        "resume=none", f"max_pixels={MAX_PIXELS}", f"max_len={prompt_tokens + 256}",
                        f"optimizer={'paged_adamw_8bit' if torch.cuda.is_available() else 'adamw'}"])
    rows = read_metrics(out_dir)
    tokens = [r["tokens_per_s"] for r in rows[1:] or rows]
    return {"peak_gib": memory_gib("peak"), "reserved_gib": memory_gib("reserved"), "sft_steps": len(rows),
            "sft_tokens_per_s": median(tokens), **loaded}


# ----------------------------------------------------------------------------------------------
# Printing: the phase table of one call, and the bench/README.md table of saved results

def print_phases(result: dict):
    w, runs = result["warmup"], {k: v for k, v in result["runs"].items() if k != "sft"}
    cpu = result["device"].startswith("CPU")
    memory = "peak memory, process RSS (GiB)" if cpu else "peak GPU memory allocated (GiB)"
    print(f"\nGRPO step, Qwen2.5-VL-{result['arch']} architecture with random weights, 4-bit QLoRA r={LORA_R}, "
          f"gradient checkpointing, on {result['device']}")
    print(f"{NUM_PROMPTS} prompts x G={GROUP_SIZE}: prompt {result['prompt_tokens']} tokens ({result['image_px']}-px "
          f"image), {result['new_tokens']} new tokens (EOS ignored); micro-batch {MICRO_BATCH}; "
          f"steps {w + 1}..{result['steps']} measured")
    if runs:
        def row(label, key):
            return (label, *[median(s[key] for s in r["steps"][w:]) for r in runs.values()])

        rows = [row("s/step (median)", "step_s"), row("  generation", "generation_s"),
                row("  log-prob (reference, no grad)", "logprob_s"),
                row("  backward (policy fwd+bwd, optimizer)", "backward_s"),
                row("generation s/token", "s_per_token"),
                row("generation tokens/s", "gen_tokens_per_s"), row("completion tokens (mean)", "completion_len"),
                (memory, *[r["peak_gib"] for r in runs.values()])]
        if not cpu:
            rows += [("peak GPU memory reserved (GiB)", *[r["reserved_gib"] for r in runs.values()]),
                     ("weights after loading (GiB)", *[r["weights_gib"] for r in runs.values()])]
        print_table(rows + [("model load (s)", *[r["load_s"] for r in runs.values()])], header=("", *runs))
    for name in [n for n in runs if n != "TRL"]:
        if "TRL" in runs:
            ratio = median(s["step_s"] for s in runs[name]["steps"][w:]) / \
                median(s["step_s"] for s in runs["TRL"]["steps"][w:])
            print(f"{name} / TRL seconds per step = {ratio:.3f} (lower is better for us)")
    if "sft" in result["runs"]:
        sft = result["runs"]["sft"]
        print(f"SFT, {sft['sft_steps']} steps (configs/sft.yaml: micro-batch 2, QLoRA r=64, checkpointing): "
              f"{sft['sft_tokens_per_s']:.0f} tokens/s, load {sft['load_s']:.1f} s, {memory} = {sft['peak_gib']:.2f}")


def print_readme_table(paths: list[str]):
    """One markdown row per run in the saved results (--json files), in bench/README.md's columns."""
    print("| date | GPU | model | run | quantisation | G x prompts | prompt + new tokens | peak GiB allocated "
          "(reserved) | s/step | generation ms/token | generation tok/s | command |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        for name, r in result["runs"].items():
            if name == "sft":  # configs/sft.yaml's steps on the same prompts, with their short answers
                work, speed = ("SFT, micro-batch 2", f"{result['prompt_tokens']:,} + answer"), ("", "", "")
            else:
                steps = r["steps"][result["warmup"]:]
                work = (f"{GROUP_SIZE} x {NUM_PROMPTS}", f"{result['prompt_tokens']:,} + {result['new_tokens']:,}")
                speed = (f"{median(s['step_s'] for s in steps):.1f}",
                         f"{1000 * median(s['s_per_token'] for s in steps):.1f}",
                         f"{median(s['gen_tokens_per_s'] for s in steps):.0f}")
            print(f"| {result['date']} | {result['device']} | {result['arch']} | {name} | NF4, LoRA r={LORA_R} | "
                  f"{work[0]} | {work[1]} | {r['peak_gib']:.1f} ({r['reserved_gib']:.1f}) | {' | '.join(speed)} | "
                  f"`{result['command']}` |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=list(ARCHS), default="7b")
    p.add_argument("--model", default=None, help="a real checkpoint (hub id or local directory) instead of random "
                   "weights of --arch, which then only sets the work's default sizes")
    p.add_argument("--runs", nargs="+", choices=[*SAMPLERS, "trl", "sft"], default=["static"],
                   help="hf | static | graph: our GRPO loop with that sampler; trl: TRL's GRPOTrainer "
                   "(bench/requirements.txt); sft: --sft-steps SFT steps")
    p.add_argument("--sft-steps", type=int, default=20)
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per run (default: 3; tiny 2)")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of s/step")
    p.add_argument("--image-px", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length, image tokens included")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--workdir", default=os.path.join(cache_dir(), "bench"), help="where the random weights are kept")
    p.add_argument("--json", default=None, help="write the figures here, updated as each run ends")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the bench/README.md table from saved --json files")
    args = p.parse_args(argv)
    if args.table:
        return print_readme_table(args.table)
    image_px, prompt_tokens, new_tokens, steps = WORK[args.arch]
    image_px, prompt_tokens = args.image_px or image_px, args.prompt_tokens or prompt_tokens
    new_tokens, steps = args.new_tokens or new_tokens, args.steps or steps
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # see bench/sft_vs_trl.py: one thread is faster and steadier on a busy CPU

    model_dir = args.model or random_model_dir(args.arch, args.workdir)
    result = {"date": time.strftime("%Y-%m-%d"), "arch": args.model or args.arch, "steps": steps,
              "warmup": args.warmup if steps > args.warmup else 0, "image_px": image_px, "new_tokens": new_tokens,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (1 thread)",
              "command": "python bench/gpu_grpo.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "versions": versions(), "runs": {}}

    def save():
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(f"{args.json}.tmp", "w") as f:
                json.dump(result, f, indent=1)
            os.replace(f"{args.json}.tmp", args.json)

    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        data, result["prompt_tokens"] = write_synthetic_data(os.path.join(tmp, "data"), model_dir, image_px,
                                                             prompt_tokens)
        for name in args.runs:  # in the order given; each saved as soon as it ends
            out = os.path.join(tmp, name)
            if name in SAMPLERS:
                result["runs"][name] = run_ours(model_dir, data, result["prompt_tokens"], new_tokens, steps, out, name)
            elif name == "trl":
                result["runs"]["TRL"] = run_trl(model_dir, data, new_tokens, steps, out)
            else:
                result["runs"]["sft"] = run_sft(model_dir, data, result["prompt_tokens"], out, args.sft_steps)
            save()
    print_phases(result)


if __name__ == "__main__":
    main()
