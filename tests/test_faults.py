"""Faults around a run, on real files and real processes: a second run into one output_dir, a resume with
other settings, a disk that fills up while a checkpoint is written."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_in_eval_keeps_the_answers_and_says_how_to_go_on(demo_data, tmp_path, signum):
    out = str(tmp_path / "eval")
    args = [sys.executable, "eval.py", "configs/demo_eval.yaml", "model=tiny", f"sets=[demo={demo_data}/test.jsonl]",
            "batch_size=1", "max_new_tokens=16", f"output_dir={out}"]
    predictions = os.path.join(out, "predictions.jsonl")
    code, err = signal_after_first_line(args, predictions, signum, timeout=120)
    assert code == 1 and "Traceback" not in err
    assert "stopped: the answers and judgements so far are kept in output_dir" in err
    answered = sum(1 for _ in open(predictions))
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and sum(1 for _ in open(predictions)) == 24 > answered  # the rest, once each


def grpo_args(demo_data, out, *extra) -> list[str]:
    return ["configs/demo_grpo.yaml", "model=tiny", f"data={demo_data}/rl.jsonl", f"output_dir={out}",
            "init_adapter=null", "reference=base", "eval_data=null", "num_prompts=2", "group_size=2",
            "max_new_tokens=8", "lr=1e-3", *extra]


def damage(checkpoint: str, how: str):
    if how == "missing state.pt":
        os.remove(os.path.join(checkpoint, "state.pt"))
    else:  # a copy cut short: half of state.pt
        path = os.path.join(checkpoint, "state.pt")
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])


@pytest.mark.parametrize("how", ["missing state.pt", "state.pt cut short"])
@pytest.mark.parametrize("loop", ["sft", "grpo"])
def test_resume_passes_over_an_incomplete_checkpoint_to_the_one_before(demo_data, tmp_path, capsys, loop, how):
    """The newest checkpoint damaged after it was written: resume=auto says so and goes on from the one before,
    and the run ends as the uninterrupted one does (its steps redone from there)."""
    import train_grpo

    main, loop_args = (train_sft.main, sft_args) if loop == "sft" else (train_grpo.main, grpo_args)

    def args(demo_data, out, *extra):  # a constant lr: the cosine's would differ with max_steps
        return loop_args(demo_data, out, "lr_schedule=constant", *extra)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    main(args(demo_data, full, "max_steps=3"))
    main(args(demo_data, part, "max_steps=2", "save_every=1"))
    newest = os.path.join(part, "checkpoints", "step_0000002")
    damage(newest, how)
    capsys.readouterr()
    main(args(demo_data, part, "max_steps=3", "save_every=1"))
    printed = capsys.readouterr().out
    assert f"resume: passing over {newest}, which is incomplete (" in printed
    assert ("state.pt is missing" if how.startswith("missing") else "BadZipFile") in printed
    assert "resumed from " + os.path.join(part, "checkpoints", "step_0000001") in printed

    def rows(out):
        return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows(part)] == [1, 2, 3]
    assert [r["loss"] for r in rows(part)] == [r["loss"] for r in rows(full)]
    # named in resume=, an incomplete checkpoint stops the run with why
    damage(os.path.join(part, "checkpoints", "step_0000003"), "cut")
    with pytest.raises(Exception, match=r"step_0000003 is incomplete \(BadZipFile"):
        main(args(demo_data, part, "max_steps=4", f"resume={part}/checkpoints/step_0000003"))


def test_a_signal_during_the_final_save_waits_for_it(tmp_path):
    """SIGTERM (a real one, to this process) while the final model is written: the writing goes on to its end,
    then the run stops saying so; a write that fails midway leaves no config.json to vouch for missing weights."""
    from pathvlm.checkpoint import signals_deferred
    from pathvlm.run import move_in

    out = tmp_path / "run"
    out.mkdir()

    def write(folder):
        os.makedirs(folder)
        (Path(folder) / "config.json").write_text("{}")
        os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-save
        time.sleep(0.05)
        (Path(folder) / "model.safetensors").write_bytes(b"weights")

    with pytest.raises(SystemExit, match="stopped by SIGTERM once the model was written"):
        with signals_deferred("the model"):
            move_in(write, str(out))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]

    def fails_midway(folder):
        os.makedirs(folder)
        (Path(folder) / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(OSError):
        move_in(fails_midway, str(broken))
    assert not (broken / "config.json").exists()


def test_a_file_size_limit_hit_while_predictions_are_written_is_one_message(demo_data, tmp_path):
    """eval.py under `ulimit -f` (as on a full disk): the write that fails is named, with what to do, exit 1, no
    traceback; the answers written before it are kept and the same command goes on from them."""
    from pathvlm.tiny import resolve_model_path

    resolve_model_path("tiny")  # built now: under the limit its weights could not be written
    out = str(tmp_path / "eval")
    args = [sys.executable, "eval.py", "configs/demo_eval.yaml", "model=tiny", f"sets=[demo={demo_data}/test.jsonl]",
            "batch_size=2", "max_new_tokens=8", f"output_dir={out}"]

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
    failed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert f"error: {out}/predictions.jsonl: File too large (a file-size limit was reached (ulimit -f): raise it)" \
        in failed.stderr
    kept = sum(1 for _ in open(os.path.join(out, "predictions.jsonl")))
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and sum(1 for _ in open(os.path.join(out, "predictions.jsonl"))) == 24 > kept
