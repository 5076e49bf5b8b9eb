"""Several processes on torch.distributed (gloo, two processes on this CPU, started by torchrun as on a
GPU node): the same numbers as one process doing the same work, one set of files, exact resume, and a
dead process that takes the run down with a message. The children run tests/dist_child.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_sft import signal_after_first_line

from test_train_grpo import assert_same_gradient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "dist_child.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # two processes on two cores
RECORD = {"RECORD_GRADIENTS": "1"}  # tests/dist_child.py saves each step's gradient
TIMING = ("step_s", "gen_s", "score_logprob_s", "train_s", "gen_tokens_per_s", "train_tokens_per_s", "tokens_per_s",
          "peak_mem_gib")


def launch(*runs: list[str], processes: int = 1, env=None, timeout=600) -> subprocess.CompletedProcess:
    """One child process, or `processes` of them under torchrun; each run is [script, key=value, ...]."""
    args = [a for run in runs for a in (*run, "--")][:-1]
    if processes == 1:
        command = [sys.executable, CHILD, *args]
    else:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        command = [torchrun, "--standalone", "--nproc_per_node", str(processes), CHILD, *args]
    result = subprocess.run(command, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True,
                            timeout=timeout)
    return result


def ok(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def rows(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def weights(out: str, name: str = "adapter_model.safetensors") -> dict:
    from safetensors.torch import load_file
    return load_file(os.path.join(out, name))


def assert_same_run(a: str, b: str, atol=1e-6):
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra[0].keys() == rb[0].keys()
    for x, y in zip(ra, rb):
        for k in x:
            assert x[k] == pytest.approx(y[k], abs=atol, rel=1e-5), (k, x["step"], x[k], y[k])
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=atol) for k in wa)


def assert_same_work(one: str, two: str):
    """One process and two doing the same work, run with RECORD: each step's gradient, as the optimizer
    is handed it, and its metrics agree up to the order of float32 sums (the rows summed in one process,
    or in each of two and then across them). The updated weights are not compared: Adam's step,
    lr·m/(√v + eps), turns the rounding of a gradient entry near 0 into a step anywhere in ±lr, on
    entries that depend on the CPU's kernels (issue 21). Later steps' gradients are taken at weights
    moved apart so: ~5e-7 in the runs measured, which moves a gradient far less than its tolerance."""
    ra, rb = rows(one), rows(two)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra[0].keys() == rb[0].keys()
    for x, y in zip(ra, rb):
        for k in x:  # metrics.jsonl keeps 6 decimals: equal values may round 1e-6 apart
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=2e-6), (k, x["step"], x[k], y[k])
    ga, gb = (torch.load(os.path.join(d, "step_gradients.pt")) for d in (one, two))
    assert len(ga) == len(gb) == len(ra)
    for x, y in zip(ga, gb):
        assert_same_gradient(x, y)


SFT = ["configs/demo_sft.yaml", "model=tiny", "finetune=lora", "eval_data=null", "max_steps=3", "lr=1e-2",
       "warmup_steps=0", "save_every=0", "grad_accum=1"]


@pytest.fixture(scope="module")
def sft_runs(demo_data, tmp_path_factory):
    """One process with batch 4 and two processes with batch 2 each: the same examples in each step."""
    tmp = tmp_path_factory.mktemp("sft")
    one, two = str(tmp / "one"), str(tmp / "two")
    ok(launch(["sft", *SFT, f"data={demo_data}/sft.jsonl", f"output_dir={one}", "batch_size=4"], env=RECORD))
    result = ok(launch(["sft", *SFT, f"data={demo_data}/sft.jsonl", f"output_dir={two}", "batch_size=2"],
                       processes=2, env=RECORD))
    return one, two, result.stdout


def test_sft_on_two_processes_equals_one_with_twice_the_batch(sft_runs):
    one, two, printed = sft_runs
    assert "effective batch 4 = batch_size 2 x grad_accum 1 x 2 process(es)" in printed
    assert_same_work(one, two)
    assert len(rows(two)) == 3 and not any(n.startswith("metrics") for n in os.listdir(two) if n != "metrics.jsonl")


GRPO = ["configs/demo_grpo.yaml", "model=tiny", "reference=base", "kl_coef=0.5", "group_size=4", "max_new_tokens=12",
        "rewards={length: 1.0}", "temperature=2.0", "max_steps=2", "save_every=0", "sample_every=1", "lr=1e-3",
        "eval_data=null", "micro_batch_size=4", "lr_schedule=constant", "warmup_steps=0"]
OBJECTIVES = [("grpo", "group"), ("grpo", "batch"), ("dapo", "group"), ("dapo", "batch")]


def test_grpo_on_two_processes_equals_one_doing_the_same_work(demo_data, sft_runs, tmp_path):
    """4 prompts a step: one process takes all 4, or two take 2 each. Each prompt's group is sampled
    from its own seed (tests/dist_child.py), so both see the same completions; then the loss, KL and
    each step's gradient must agree, for the grpo and dapo normalisers and group and batch reward
    scaling. The policy starts from an SFT adapter and the reference is the base (KL > 0), so the
    loss is not 0 and a normaliser counted per process (x2) shows in it; gradients left unsummed, or
    advantages scaled by one process's std, show in the gradient."""
    runs = {n: [] for n in (1, 2)}
    for loss_type, scale in OBJECTIVES:
        for n in (1, 2):
            runs[n].append(["grpo", *GRPO, f"data={demo_data}/rl.jsonl", f"init_adapter={sft_runs[0]}",
                            f"output_dir={tmp_path}/{loss_type}-{scale}-{n}", f"num_prompts={4 // n}",
                            f"loss_type={loss_type}", f"scale_rewards={scale}"])
    ok(launch(*runs[1], env={"SAMPLE_EACH_PROMPT": "1", **RECORD}))
    ok(launch(*runs[2], processes=2, env={"SAMPLE_EACH_PROMPT": "1", **RECORD}))
    for loss_type, scale in OBJECTIVES:
        one, two = (f"{tmp_path}/{loss_type}-{scale}-{n}" for n in (1, 2))
        assert_same_work(one, two)
        assert abs(rows(two)[0]["loss"]) > 1e-4  # the KL term makes it count
        with open(os.path.join(one, "samples.jsonl")) as a, open(os.path.join(two, "samples.jsonl")) as b:
            assert a.read() == b.read()  # one file, every process's samples, in the one-process order


def test_eval_on_two_processes_writes_the_one_process_predictions(demo_data, tmp_path):
    common = ["configs/demo_eval.yaml", "model=tiny", f"sets=[demo={demo_data}/test.jsonl]", "limit=10",
              "max_new_tokens=8", "batch_size=2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ok(launch(["eval", *common, f"output_dir={one}"]))
    ok(launch(["eval", *common, f"output_dir={two}"], processes=2))
    for name in ("predictions.jsonl",):
        with open(os.path.join(one, name), "rb") as a, open(os.path.join(two, name), "rb") as b:
            assert a.read() == b.read()
    metrics = [json.load(open(os.path.join(d, "metrics.json")))["sets"]["demo"] for d in (one, two)]
    for m in metrics:
        m.pop("items_per_s")
    assert metrics[0] == metrics[1] and metrics[0]["n"] == 10


def test_two_process_grpo_resumes_exactly_and_refuses_another_process_count(demo_data, sft_runs, tmp_path):
    common = ["grpo", *GRPO, f"data={demo_data}/rl.jsonl", f"init_adapter={sft_runs[0]}", "num_prompts=2",
              "save_every=2", "max_steps=4"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    ok(launch([*common, f"output_dir={full}"], processes=2))
    ok(launch([*common, f"output_dir={part}", "max_steps=2"], processes=2))
    result = ok(launch([*common, f"output_dir={part}"], processes=2))
    assert "resumed from" in result.stdout and "step_0000002 at step 2" in result.stdout
    assert_same_run(full, part, atol=0)
    assert not os.path.exists(os.path.join(part, "samples.jsonl.tmp"))
    refused = launch([*common, f"output_dir={part}", "max_steps=6"])  # one process, a 2-process checkpoint
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "written by 2 process(es), this run has 1" in refused.stderr


def test_a_killed_process_takes_the_run_down_with_a_message(demo_data, tmp_path):
    start = time.monotonic()
    result = launch(["grpo", *GRPO, f"data={demo_data}/rl.jsonl", "init_adapter=null", "num_prompts=2",
                     "max_steps=50", f"output_dir={tmp_path}/g"], processes=2, env={"KILL_RANK": "1"}, timeout=300)
    assert result.returncode != 0 and time.monotonic() - start < 120
    assert "SIGKILL" in result.stderr and "local_rank: 1" in result.stderr  # torchrun names the process and why


def sigterm_torchrun_after_first_step(args: list[str], out: str, shutdown_timeout: int) -> tuple[int, str]:
    """torchrun --shutdown-timeout S with two processes running `args`; SIGTERM to torchrun itself (as a
    cluster's preemption sends it) once the first step is logged. -> (exit code, stderr)."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "--shutdown-timeout", str(shutdown_timeout), CHILD,
               *args]
    return signal_after_first_line(command, os.path.join(out, "metrics.jsonl"), signal.SIGTERM, env=ENV)


def test_sigterm_to_torchrun_finishes_the_step_and_saves_when_its_shutdown_timeout_allows(demo_data, tmp_path):
    """torchrun forwards the signal, then SIGKILLs its processes after --shutdown-timeout. Long enough (120 s):
    every process finishes the step, they save one checkpoint together and stop, and what they print on the
    signal names the flag. Too short (0 s): they are killed mid-step and nothing is saved."""
    args = ["grpo", *GRPO, f"data={demo_data}/rl.jsonl", "init_adapter=null", "num_prompts=2", "max_steps=50",
            "save_every=0"]
    out = str(tmp_path / "long")
    code, err = sigterm_torchrun_after_first_step([*args, f"output_dir={out}"], out, shutdown_timeout=120)
    assert code != 0 and "SIGTERM: finishing this step" in err and "--shutdown-timeout" in err
    [saved] = os.listdir(os.path.join(out, "checkpoints"))
    stopped_at = int(saved.split("_")[1])
    assert f"stopped by SIGTERM after step {stopped_at}: saved" in err
    assert [r["step"] for r in rows(out)] == list(range(1, stopped_at + 1))
    out = str(tmp_path / "short")
    code, err = sigterm_torchrun_after_first_step([*args, f"output_dir={out}"], out, shutdown_timeout=0)
    assert code != 0 and not os.path.exists(os.path.join(out, "checkpoints"))  # killed before a word or a save


CACHE_WRITER = """
import json, os, sys
sys.path.insert(0, {root!r})
os.environ["CACHE_TEST_KEY"] = "k"
from pathvlm.judges import APIJudge
judge = APIJudge("m", api_key_env="CACHE_TEST_KEY", cache_dir={cache!r})
for i in range(300):
    key = f"shared-{{i % 20}}"  # every process writes the same 20 keys, over and over
    judge._cache_put(key, json.dumps({{"writer": os.getpid(), "i": i, "pad": "x" * 2000}}))
    assert judge._cache_get(key) is not None
"""


def test_judge_cache_stays_whole_with_several_writers(tmp_path):
    """Processes of one run judge their own completions into one on-disk cache: two writers racing on
    the same keys never leave a half-written entry for a reader (each writes a temporary file of its
    own and renames it)."""
    script = CACHE_WRITER.format(root=ROOT, cache=str(tmp_path / "cache"))
    writers = [subprocess.Popen([sys.executable, "-c", script], env=ENV) for _ in range(2)]
    try:
        assert all(w.wait(timeout=120) == 0 for w in writers)
    finally:
        for w in writers:
            w.kill()  # a no-op for a writer that has exited
    entries = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "cache") for f in files]
    assert len(entries) == 20  # no temporary file left behind
    for path in entries:
        with open(path) as f:
            assert json.loads(json.load(f)["reply"])["pad"] == "x" * 2000
