"""kill -9 (SIGKILL): no handler runs, nothing is flushed, nothing is saved on the way out. Real SFT and
GRPO runs, each in its own process, are killed after a checkpoint, with rows logged past it, and again
during a checkpoint write (the temp dir complete, the rename not done); the same command run again
resumes from the newest complete checkpoint, says which, and gives exactly the uninterrupted run: every
metrics row, samples.jsonl, the final weights. Killed while a step's checkpoint is saved a second time,
a run still finds a whole one.

The killed run differs from the others by a few lines of fault injection in its own process (FAULTS);
the code under test is not touched."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pathvlm import checkpoint
from test_train_grpo import LENGTH_REWARD, grpo_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What two runs of the same command never share, killed or not: wall-clock timings (tokens_per_s is
# SFT's, the rest GRPO's) and peak_mem_gib, the process's peak RSS on the CPU (a resumed process has
# not run the steps before its checkpoint). Every other key of every row must be equal.
NOT_REPRODUCIBLE = {"tokens_per_s", "gen_tokens_per_s", "train_tokens_per_s", "step_s", "gen_s",
                    "score_logprob_s", "train_s", "peak_mem_gib"}

LOOPS = ["train_sft", "train_grpo"]
MAX_STEPS = 6  # checkpoints every 2 steps (step_2, step_4); each killed run dies in step 4

FAULTS = {
    # Step 4 has run (batch drawn, weights updated, RNG moved on) but is not logged yet; on disk are
    # checkpoint step_2 and the rows of step 3 (metrics.jsonl, and samples.jsonl for GRPO), which a
    # resume from step_2 must drop. The child waits there, so the test's SIGKILL lands at that point
    # however loaded the machine is.
    "pause_before_logging_step_4": """
write = checkpoint.MetricsLog.write
def write_or_wait(log, row):
    if row["step"] == 4:
        open(os.environ["KILL_ME"], "w").close()
        time.sleep(600)
    write(log, row)
checkpoint.MetricsLog.write = write_or_wait
""",
    # The temp dir of checkpoint step_4 is complete (state, loop position, GRPO's adapter); the process
    # dies before os.replace renames it to step_4.
    "die_before_renaming_step_4": """
replace = os.replace
def die_or_replace(src, dst):
    if os.path.basename(src) == ".tmp-step_0000004":
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)
os.replace = die_or_replace
""",
}


def args_for(loop: str, demo_data: str, out: str) -> list[str]:
    if loop == "train_sft":
        return ["configs/demo_sft.yaml", "model=tiny", f"data={demo_data}/sft.jsonl", "eval_data=null",
                f"output_dir={out}", "finetune=lora", "batch_size=4", "lr=1e-3", "save_every=2",
                f"max_steps={MAX_STEPS}"]
    return grpo_args(demo_data, out, "init_adapter=null", "reference=base", "temperature=2.0",
                     "rewards={length: 1.0}", f"max_steps={MAX_STEPS}")  # save_every=2, sample_every=1


def command(loop: str, argv: list[str], fault: str | None = None) -> list[str]:
    """`loop`.main(argv) in a new Python process, with the length reward that gives an untrained tiny
    model's groups a reward spread (see test_train_grpo.py)."""
    script = (f"import os, signal, sys, time, rewards, {loop}\nfrom pathvlm import checkpoint\n"
              f"rewards.REWARDS['length'] = {LENGTH_REWARD}\n"
              f"{FAULTS[fault] if fault else ''}\n"
              f"{loop}.main(sys.argv[1:])\n")
    return [sys.executable, "-c", script, *argv]


def launch(cmd: list[str], log: str, **env) -> subprocess.Popen:
    # One thread per process: runs go side by side on a 2-core machine without slowing each other
    # tenfold, and every run of the command does the same arithmetic. Unbuffered: what a killed process
    # printed ("resumed from ...") would otherwise die with it in its buffer.
    with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env})
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    return open(proc.log).read()


def finish(proc: subprocess.Popen) -> str:
    """Wait for a run that must succeed; its output."""
    assert proc.wait(timeout=300) == 0, output(proc)[-3000:]
    return output(proc)


def stop_all(procs):
    """Kill what still runs when a test ends (it failed), so that no paused run is left waiting."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def start():
    """start(cmd, log, **env): launch, and kill at the test's end whatever still runs."""
    running = []

    def start(cmd: list[str], log: str, **env) -> subprocess.Popen:
        running.append(launch(cmd, log, **env))
        return running[-1]
    yield start
    stop_all(running)


@pytest.fixture(scope="module")
def uninterrupted(demo_data, tmp_path_factory):
    """uninterrupted(loop): the output dir of that loop's uninterrupted run, once it has finished. Both
    loops' runs start at once in the background, and the tests share them."""
    from pathvlm.tiny import resolve_model_path

    resolve_model_path("tiny")  # built here once, not by each process
    root = str(tmp_path_factory.mktemp("uninterrupted"))
    outs = {loop: os.path.join(root, loop) for loop in LOOPS}
    procs = {loop: launch(command(loop, args_for(loop, demo_data, out)), f"{out}.log") for loop, out in outs.items()}

    def finished(loop: str) -> str:
        finish(procs[loop])
        return outs[loop]
    yield finished
    stop_all(procs.values())


def logged_steps(path: str) -> list[int]:
    return [json.loads(line)["step"] for line in open(path)] if os.path.isfile(path) else []


def checkpoints(out: str) -> list[str]:
    return sorted(os.listdir(os.path.join(out, "checkpoints")))


def assert_same_run(resumed: str, full: str, loop: str):
    rows = [[{k: v for k, v in json.loads(line).items() if k not in NOT_REPRODUCIBLE}
             for line in open(os.path.join(d, "metrics.jsonl"))] for d in (resumed, full)]
    assert [r["step"] for r in rows[0]] == list(range(1, MAX_STEPS + 1))  # each step once, none lost
    for a, b in zip(*rows):
        assert a == b, (a, b)  # exact, not approximately
    if loop == "train_grpo":
        samples = [open(os.path.join(d, "samples.jsonl")).read() for d in (resumed, full)]
        assert samples[0] == samples[1]  # the same prompts and completions, each step once
    weights = [load_file(os.path.join(d, "adapter_model.safetensors")) for d in (resumed, full)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    assert checkpoints(resumed) == checkpoints(full) == ["step_0000004", "step_0000006"]  # no .tmp left


@pytest.mark.parametrize("loop", LOOPS)
def test_kill_9_twice_then_the_same_command_equals_the_uninterrupted_run(demo_data, tmp_path, start, uninterrupted,
                                                                          loop):
    """Killed mid-step past a checkpoint, then, run again, killed while writing the next checkpoint; run a
    third time, it finishes as if never stopped."""
    part, kill_me = str(tmp_path / "part"), str(tmp_path / "kill_me")
    metrics, samples = os.path.join(part, "metrics.jsonl"), os.path.join(part, "samples.jsonl")

    # 1. SIGKILL from here, in step 4: on disk are checkpoint step_2 and the rows of step 3, logged after it
    killed = start(command(loop, args_for(loop, demo_data, part), "pause_before_logging_step_4"), f"{part}.1.log",
                   KILL_ME=kill_me)
    deadline = time.monotonic() + 300
    while not os.path.exists(kill_me) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(kill_me), output(killed)[-3000:]
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert checkpoints(part) == ["step_0000002"]
    assert logged_steps(metrics) == [1, 2, 3]
    if loop == "train_grpo":
        assert set(logged_steps(samples)) == {1, 2, 3}

    # 2. run again: it resumes from step_2, drops the rows of step 3, redoes steps 3 and 4, and dies in its
    # save of step 4 with the temp dir complete (a whole checkpoint) but not renamed
    killed = start(command(loop, args_for(loop, demo_data, part), "die_before_renaming_step_4"), f"{part}.2.log")
    assert killed.wait(timeout=300) == -signal.SIGKILL, output(killed)[-3000:]
    assert f"resumed from {part}/checkpoints/step_0000002 at step 2" in output(killed)
    assert checkpoints(part) == [".tmp-step_0000004", "step_0000002"]
    saved = {"state.pt", "loop.json", *(["model"] if loop == "train_grpo" else [])}
    assert saved <= set(os.listdir(os.path.join(part, "checkpoints", ".tmp-step_0000004")))
    assert logged_steps(metrics) == [1, 2, 3, 4]  # step 3 once: the first run's row was dropped
    if loop == "train_grpo":
        assert set(logged_steps(samples)) == {1, 2, 3, 4}

    # 3. run again: only a renamed step_N counts as complete, so it resumes from step_2 again and says so;
    # its own save of step 4 removes the leftover temp dir first
    log = finish(start(command(loop, args_for(loop, demo_data, part)), f"{part}.3.log"))
    assert f"resumed from {part}/checkpoints/step_0000002 at step 2" in log
    assert_same_run(part, uninterrupted(loop), loop)


def test_kill_9_while_a_finished_run_saves_its_last_checkpoint_again(tmp_path):
    """Run again, a finished run resumes from its last checkpoint and saves that step again (so does a
    run killed after its last checkpoint, in save_trained or the merged export). The old step_N must not
    be deleted in place: killed midway, a half-deleted step_N would be the newest for resume=auto."""
    out = str(tmp_path)
    script = f"""
import os, signal, torch
from pathvlm import checkpoint
model = torch.nn.Linear(2, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for step in (2, 4):
    checkpoint.save_checkpoint({out!r}, step, model, optimizer, None, {{"data": step}})
unlink = os.unlink
def unlink_then_die(*args, **kwargs):  # the kill lands just after this save deletes its first file
    unlink(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
os.unlink = unlink_then_die
checkpoint.save_checkpoint({out!r}, 4, model, optimizer, None, {{"data": 4}})
"""
    proc = launch([sys.executable, "-c", script], f"{out}/log")
    assert proc.wait(timeout=60) == -signal.SIGKILL, output(proc)
    model = torch.nn.Linear(2, 2)
    path = checkpoint.find_resume(out, "auto")
    loop = checkpoint.load_checkpoint(path, model, torch.optim.SGD(model.parameters(), lr=0.1), None)
    assert loop == {"step": 4, "data": 4} and path.endswith("step_0000004")
