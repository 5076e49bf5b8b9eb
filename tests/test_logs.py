"""What both training loops write in metrics.jsonl: the rows of the run being started or resumed, never
those of an earlier attempt that left no checkpoint; and, on each row, the learning rate its step used."""

import json
import os
import shutil

import train_grpo
import train_sft


def rows(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def sft(demo_data, out, *extra):
    train_sft.main(["configs/demo_sft.yaml", f"data={demo_data}/sft.jsonl", "eval_data=null", f"output_dir={out}",
                    "model=tiny", "batch_size=4", "finetune=lora", "lr=1e-3", "warmup_steps=2", "lr_schedule=constant",
                    *extra])
    return rows(out)


def grpo(demo_data, out, *extra):
    train_grpo.main(["configs/demo_grpo.yaml", "model=tiny", f"data={demo_data}/rl.jsonl", f"output_dir={out}",
                     "init_adapter=null", "reference=base", "num_prompts=2", "group_size=2", "max_new_tokens=8",
                     "eval_data=null", "sample_every=1", "lr=1e-3", "warmup_steps=2", "lr_schedule=constant", *extra])
    return rows(out)


def test_a_rerun_without_a_checkpoint_starts_the_logs_afresh(demo_data, tmp_path):
    for name, loop in (("sft", sft), ("grpo", grpo)):
        out = str(tmp_path / name)
        loop(demo_data, out, "max_steps=3", "save_every=0")
        shutil.rmtree(os.path.join(out, "checkpoints"))  # as a run killed before its first checkpoint leaves it
        assert [r["step"] for r in loop(demo_data, out, "max_steps=3", "save_every=0")] == [1, 2, 3], name
        # a new run into a used output_dir (resume=none) logs its own steps only
        assert [r["step"] for r in loop(demo_data, out, "max_steps=2", "resume=none")] == [1, 2], name
        if name == "grpo":
            samples = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
            assert sorted({s["step"] for s in samples}) == [1, 2]


def test_the_logged_lr_is_the_one_the_step_used(demo_data, tmp_path):
    """Warm-up over 2 steps: step 1 updates at lr/2, step 2 at lr (the scheduler is stepped after the update)."""
    for name, loop in (("sft", sft), ("grpo", grpo)):
        logged = [r["lr"] for r in loop(demo_data, str(tmp_path / name), "max_steps=3")]
        assert logged == [5e-4, 1e-3, 1e-3], name
