"""Faults around a run, on real files and real processes: a second run into one output_dir, a resume with
other settings, a disk that fills up while a checkpoint is written."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

import train_sft
from test_sft import signal_after_first_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sft_args(demo_data, out, *extra) -> list[str]:
    return ["configs/demo_sft.yaml", f"data={demo_data}/sft.jsonl", "eval_data=null", f"output_dir={out}", "model=tiny",
            "batch_size=4", "finetune=lora", "lr=1e-3", "warmup_steps=0", *extra]


def run_sft(args: list[str], file_size_limit: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """train_sft.py in its own process; file_size_limit (bytes): no file it writes may grow past it (as on a
    disk that fills up; Python ignores SIGXFSZ, so a write past it fails with EFBIG)."""
    def limit():
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.run([sys.executable, "train_sft.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit)


def test_a_second_run_into_a_used_output_dir_is_refused_and_a_killed_ones_lock_is_not(demo_data, tmp_path):
    out = str(tmp_path / "run")
    first = subprocess.Popen([sys.executable, "train_sft.py", *sft_args(demo_data, out, "max_steps=100000")],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not os.path.isfile(os.path.join(out, "metrics.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.05)  # the first run holds the lock and has begun to log
        second = run_sft(sft_args(demo_data, out, "max_steps=2"))
        assert second.returncode != 0 and "Traceback" not in second.stderr
        assert f"output_dir {out} is in use by pid {first.pid}" in second.stderr
    finally:
        first.kill()  # kill -9: the kernel drops its lock with it
        first.wait()
    third = run_sft(sft_args(demo_data, out, "max_steps=2"))
    assert third.returncode == 0, third.stderr[-2000:]


def test_resume_with_other_settings_names_every_key_that_differs(demo_data, tmp_path):
    out = str(tmp_path / "run")
    train_sft.main(sft_args(demo_data, out, "max_steps=2", "save_every=1"))
    with pytest.raises(Exception, match=r"written with other settings \(lora_r: 8 -> 16, lr: 0\.001 -> 0\.01\)"):
        train_sft.main(sft_args(demo_data, out, "max_steps=4", "lr=1e-2", "lora_r=16"))
    assert "lr: 0.001" in open(os.path.join(out, "config.yaml")).read()  # the refused run wrote nothing
    train_sft.main(sft_args(demo_data, out, "max_steps=3"))  # more steps may be asked for
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]


def test_a_disk_that_fills_up_during_a_checkpoint_keeps_the_last_good_one(demo_data, tmp_path):
    out = str(tmp_path / "run")
    assert run_sft(sft_args(demo_data, out, "max_steps=2", "save_every=2")).returncode == 0
    # checkpoints of the tiny LoRA are ~240 KB: a 100 KB file limit fails the next one part-way through
    failed = run_sft(sft_args(demo_data, out, "max_steps=4", "save_every=1"), file_size_limit=100_000)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "could not write the checkpoint of step 3" in failed.stderr
    assert "the file stopped part-way: the disk is full" in failed.stderr and "over 98 KiB (ulimit -f)" in failed.stderr
    assert "step_0000002, is untouched" in failed.stderr
    checkpoints = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["step_0000002"]  # no partial copy left behind
    resumed = run_sft(sft_args(demo_data, out, "max_steps=4", "save_every=1"))  # space again: it goes on
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout and "step_0000002" in resumed.stdout


def test_ctrl_c_in_eval_keeps_the_answers_and_says_how_to_go_on(demo_data, tmp_path):
    out = str(tmp_path / "eval")
    args = [sys.executable, "eval.py", "configs/demo_eval.yaml", "model=tiny", f"sets=[demo={demo_data}/test.jsonl]",
            "batch_size=1", "max_new_tokens=16", f"output_dir={out}"]
    predictions = os.path.join(out, "predictions.jsonl")
    code, err = signal_after_first_line(args, predictions, signal.SIGINT, timeout=120)
    assert code == 1 and "Traceback" not in err
    assert "stopped: the answers so far are saved in predictions.jsonl" in err
    answered = sum(1 for _ in open(predictions))
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and sum(1 for _ in open(predictions)) == 24 > answered  # the rest, once each
