"""eval.py's reasoning-quality judge: the rule scorer checked by hand, judge=rule end to end on the tiny
model, judge=api against a real OpenAI-compatible server on loopback, and resume from judgements.jsonl."""

import io
import json
import os
import shutil
import socket

import pytest

from tools import report
from eval import run
from pathvlm.evaluation import load_sets, prompt_key, score
from pathvlm.judges import make_judge
from pathvlm.reasoning import REASONING_KEYS, REASONING_RUBRIC, reasoning_request
from pathvlm.records import Record
from pathvlm.rule_judge import rule_reasoning_scores
from pathvlm.verdicts import JudgeDown, parse_scores
from test_eval import data, eval_cfg, one_thread, read_lines, tiny  # noqa: F401  (fixtures)
from test_rewards import API_KEY, API_KEY_ENV, GOOD_REPLY, ChatHandler, running_server
from test_rewards import server  # noqa: F401  (fixture; it resets this module's chat_server)

OPTIONS = ["brown", "blue", "mixed"]
RECORD = Record(id="r1", image="r1.png", question="Which stain dominates this patch?", options=OPTIONS, answer="A")
GOOD = ("<think>The patch shows brown DAB staining over most cells. Blue is ruled out and mixed is unlikely, "
        "because DAB is a marker of the antigen.</think><answer>A) brown</answer>")
# the test sets' items 0, 1, 2 have gold answers A, B, C (test_eval.data)
WITH_THINK = GOOD
NO_THINK = "<answer>B) blue</answer>"
EMPTY = "<think> </think><answer></answer>"
SERVED = {"reasoning_accuracy": 0.9, "knowledge_accuracy": 0.8, "rigor": 0.7, "professionalism": 0.6,
          "clarity": 0.5, "conciseness": 0.4}


# ----------------------------------------------------------------------------------------------
# The rule scorer, by hand

def test_rule_reasoning_scores_by_hand():
    think = GOOD[len("<think>"):GOOD.index("</think>")]
    # right and uncontradicted; 2 knowledge statements (", because ..." is a clause of its own); blue and
    # mixed set aside; > 4 pathology
    # terms; exact format with sentences of 9 and 15 words; 26 words, no sentence repeated
    assert rule_reasoning_scores(OPTIONS, GOOD, think, "A", "A") == dict.fromkeys(REASONING_KEYS, 1.0)
    # the same reasoning behind a wrong answer: not accurate, the rest unchanged
    assert rule_reasoning_scores(OPTIONS, GOOD, think, "A", "B")["reasoning_accuracy"] == 0.0
    poor = "<think>Brown. Brown. Brown. Answer is B.</think><answer>A) brown</answer>"
    assert rule_reasoning_scores(OPTIONS, poor, "Brown. Brown. Brown. Answer is B.", "A", "A") == {
        "reasoning_accuracy": 0.5,  # right letter, but the reasoning concludes B
        "knowledge_accuracy": 0.0, "rigor": 0.0,  # no cue, no other option set aside
        "professionalism": 0.0,  # "Brown." is a word, no statement: its term does not count
        "clarity": 0.5,  # exact format, but sentences of 6/4 = 1.5 words
        "conciseness": 0.6}  # short, but 3 of its 5 sentences are distinct (brown. ×3, answer is b., a) brown)
    # no <think>: nothing to grade but its brevity
    assert rule_reasoning_scores(OPTIONS, NO_THINK, "", "B", "B") == {**dict.fromkeys(REASONING_KEYS, 0.0),
                                                                      "conciseness": 1.0}
    # 450 words and more: conciseness 0
    assert rule_reasoning_scores(OPTIONS, "<think>" + "cells " * 450 + "</think>", "cells " * 450, None,
                                 "A")["conciseness"] == 0.0


def test_reasoning_request_and_rule_judge_reply():
    request = reasoning_request(RECORD, GOOD)
    assert request.system == REASONING_RUBRIC and request.image == "r1.png"
    lines = request.user.splitlines()
    assert json.loads(lines[1])["options"] == {"A": "brown", "B": "blue", "C": "mixed"}
    assert lines[2] == "Correct answer: option A of the case" and json.loads(lines[-1]) == GOOD
    assert request.keys == tuple(REASONING_KEYS)
    # the rule judge replies JSON text, read by the same parser as a model judge's
    [reply] = make_judge("rule").complete([request])
    assert parse_scores(reply, REASONING_KEYS) == dict.fromkeys(REASONING_KEYS, 1.0)
    assert reasoning_request(RECORD, NO_THINK) is not None  # no reasoning, still graded
    assert reasoning_request(RECORD, EMPTY) is None and reasoning_request(RECORD, "  ") is None  # 0, unasked


# ----------------------------------------------------------------------------------------------
# judge=rule end to end on the tiny model

def test_rule_judge_end_to_end(tiny, data, tmp_path):
    out = tmp_path / "rule"
    metrics = run(eval_cfg(data, out, judge="rule", limit=3), *tiny)
    with open(out / "metrics.json") as f:
        assert json.load(f) == json.loads(json.dumps(metrics))
    lines = read_lines(out / "judgements.jsonl")
    assert sorted((j["set"], j["id"]) for j in lines) == sorted(
        (name, f"{name}-{i:03d}") for name in ["pathmmu", "chest_ct"] for i in range(3))
    for name, m in metrics["sets"].items():
        r, mine = m["reasoning"], [j for j in lines if j["set"] == name]
        assert r["n_judged"] == 3 and r["n_unparsed"] == 0  # the rule judge always answers
        for key in REASONING_KEYS:
            assert 0.0 <= r[key] <= 1.0
            assert r[key] == pytest.approx(sum(j["scores"][key] for j in mine) / 3)
        assert 0.0 <= r["process_score"] <= 1.0 and r["process_n_judged"] == 3
        for j in mine:  # the raw reply is kept; empty completions have none
            assert j["judge"] == "rule"
            assert j["reply"] is None or parse_scores(j["reply"], REASONING_KEYS) == j["scores"]
    assert metrics["judge"]["kind"] == "rule" and metrics["judge"]["calls"] > 0

    report.main([str(out), "--out", str(tmp_path / "report")])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Reasoning quality" in md and "| rule | pathmmu | rule | 3 / 3 |" in md
    assert list(report.REASONING_COLUMNS) == REASONING_KEYS + ["process_score"]


# ----------------------------------------------------------------------------------------------
# judge=api against test_rewards' server, answering the reasoning rubric with SERVED

class RubricHandler(ChatHandler):
    """ChatHandler, whose good reply holds the process rubric's keys, answering REASONING_RUBRIC's
    requests with SERVED instead; "garbage" and the other modes as before."""

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        self.reasoning = json.loads(raw)["messages"][0]["content"] == REASONING_RUBRIC
        self.rfile = io.BytesIO(raw)  # for ChatHandler to read again (HTTP/1.0: one request a connection)
        super().do_POST()

    def send_json(self, status: int, obj: dict):
        if status == 200 and self.reasoning and obj["choices"][0]["message"]["content"] == GOOD_REPLY:
            obj["choices"][0]["message"]["content"] = json.dumps(SERVED)
        super().send_json(status, obj)


@pytest.fixture(scope="module")
def chat_server():
    with running_server(RubricHandler) as server:
        yield server


def api_cfg(data, out, server, **kw):
    return eval_cfg(data, out, judge="api", judge_model="judge-test", judge_api_key_env=API_KEY_ENV,
                    judge_base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", judge_concurrency=2, **kw)


def write_predictions(out, data, completions: list[str]):
    """predictions.jsonl as a finished generation would leave it, item i of each set answering
    completions[i]: run() resumes it and only judges, so the judge sees known completions."""
    os.makedirs(out, exist_ok=True)
    sets = load_sets([f"{name}={path}" for name, path in data.items()], limit=len(completions))
    with open(out / "predictions.jsonl", "w") as f:
        for name, records in sets.items():
            for r, c in zip(records, completions):
                pred = {"id": r.id, "set": name, "completion": c, **score(c, r), "gold": r.answer,
                        "completion_tokens": len(c.split()), "prompt": prompt_key(r)}
                f.write(json.dumps(pred) + "\n")


def files_under(*dirs) -> list[str]:
    return [os.path.join(d, f) for top in dirs for d, _, names in os.walk(top) for f in names]


def test_api_judge_means_are_the_served_scores(tiny, data, server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATHVLM_CACHE", str(tmp_path / "cache"))  # the API judge's disk cache
    out = tmp_path / "api"
    write_predictions(out, data, [WITH_THINK, NO_THINK])
    metrics = run(api_cfg(data, out, server, limit=2), *tiny)
    for name, m in metrics["sets"].items():
        assert m["generated"] == 0
        r = m["reasoning"]
        assert {k: r[k] for k in REASONING_KEYS} == pytest.approx(SERVED)
        assert (r["n_judged"], r["n_empty"], r["n_unparsed"]) == (2, 0, 0)
        # process rubric: GOOD_REPLY's (0.8 + 0.6)/2 for the reasoning, 0 unasked without <think>
        assert r["process_score"] == pytest.approx(0.35) and r["process_n_judged"] == 2
    # per set: two reasoning requests, one process request
    requests = server.state.requests
    assert len(requests) == 6
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    assert metrics["judge"] == {"kind": "api", "model": "judge-test", "base_url": base_url, "calls": 6,
                                "cache_hits": 0, "retries": 0, "failures": 0, "prompt_tokens": 6 * 120,
                                "completion_tokens": 6 * 15, "fallbacks": 0, "no_think": 2, "no_answer": 0,
                                "to_grader": 0, "schema_refused": 0}
    reasoning = [q["body"]["messages"] for q in requests if q["body"]["messages"][0]["content"] == REASONING_RUBRIC]
    assert len(reasoning) == 4
    for system, user in reasoning:
        image, text = user["content"]
        assert image["image_url"]["url"].startswith("data:image/png;base64,")
        assert "Correct answer: " in text["text"] and ("<answer>A) brown</answer>" in text["text"]
                                                       or NO_THINK in text["text"])
    lines = read_lines(out / "judgements.jsonl")
    assert len(lines) == 4 and all(json.loads(j["reply"]) == SERVED for j in lines)
    assert all(j["judge"] == "api:judge-test" for j in lines)
    # the key is in no file of the run or of the judge's cache, and not on the console
    assert len(files_under(tmp_path / "cache")) == 6  # one reply per request
    for path in files_under(out, tmp_path / "cache"):
        with open(path, "rb") as f:
            assert API_KEY.encode() not in f.read(), path
    assert API_KEY not in capsys.readouterr().out


def test_api_judge_garbage_is_left_out_and_resume_asks_only_the_rest(tiny, data, server, tmp_path, monkeypatch):
    monkeypatch.setenv("PATHVLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "resume"
    write_predictions(out, data, [WITH_THINK, NO_THINK, EMPTY])

    # 1. a judge that answers no scores: counted, left out of the means, never replaced by a guess
    server.state.mode = "garbage"
    first = run(api_cfg(data, out, server, limit=2, judge_max_failure_share=1.0), *tiny)  # 1: never stop
    assert len(server.state.requests) == 6
    assert first["judge"]["fallbacks"] == 6  # 4 reasoning + 2 process replies
    for m in first["sets"].values():
        r = m["reasoning"]
        assert all(r[k] is None for k in REASONING_KEYS) and (r["n_judged"], r["n_unparsed"]) == (0, 2)
        assert r["process_score"] == 0.0 and r["process_n_judged"] == 1  # no <think>: 0 by the rubric
    lines = read_lines(out / "judgements.jsonl")
    assert all(j["reply"] == "I think the student did fine overall." and j["scores"] is None for j in lines)
    report.main([str(out), "--out", str(tmp_path / "report")])  # means of None print as –
    assert "| resume | pathmmu | api (judge-test) | 0 / 2 | – |" in (tmp_path / "report" / "report.md").read_text()

    # a call that got no reply (a 5xx after every retry) leaves nulls: that item is asked again
    lines[0].update(reply=None, scores=None, process_reply=None, process_score=None)
    (out / "judgements.jsonl").write_text("".join(json.dumps(j) + "\n" for j in lines))
    failed = (lines[0]["set"], lines[0]["id"])
    assert lines[0]["id"].endswith("-000")  # the item with <think>: two requests

    # 2. the server answers now; with its disk cache gone only judgements.jsonl can spare requests
    shutil.rmtree(tmp_path / "cache")
    server.state.mode = "good"
    server.state.requests.clear()
    second = run(api_cfg(data, out, server, limit=3), *tiny)
    assert len(server.state.requests) == 2  # the failed item's two rubrics; the empty items: none
    for name, m in second["sets"].items():
        r = m["reasoning"]
        if name == failed[0]:  # the retried item's SERVED and the empty item's zeros; its garbage left out
            assert {k: r[k] for k in REASONING_KEYS} == pytest.approx({k: v / 2 for k, v in SERVED.items()})
            assert (r["n_judged"], r["n_empty"], r["n_unparsed"]) == (2, 1, 1)
            assert r["process_score"] == pytest.approx(0.35 * 2 / 3)  # 0.7, 0 and 0 (no <think>, twice)
        else:
            assert all(r[k] == 0.0 for k in REASONING_KEYS) and (r["n_judged"], r["n_unparsed"]) == (1, 2)
    assert second["judge"]["calls"] == 2 and second["judge"]["no_think"] == 2
    lines = read_lines(out / "judgements.jsonl")
    assert len(lines) == 4 + 1 + 2  # appended: the retried item, the two empty ones

    # 3. everything judged: nothing is asked; another judge grades afresh beside the API's lines
    server.state.requests.clear()
    assert run(api_cfg(data, out, server, limit=3), *tiny)["sets"] == second["sets"]
    assert server.state.requests == []
    rule = run(eval_cfg(data, out, judge="rule", limit=3), *tiny)
    assert all(m["reasoning"]["n_judged"] == 3 for m in rule["sets"].values())
    assert len(read_lines(out / "judgements.jsonl")) == 7 + 6 and server.state.requests == []


def test_a_dead_judge_stops_eval_with_the_url_and_the_last_error(tiny, data, server, tmp_path, monkeypatch):
    """A wrong judge_base_url used to end in "judged 0" and exit 0: R1's process score silently absent."""
    monkeypatch.setenv("PATHVLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "dead"
    write_predictions(out, data, [WITH_THINK, NO_THINK])
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    cfg = api_cfg(data, out, server, limit=2, judge_max_retries=1)
    cfg.judge_base_url = dead_url
    with pytest.raises(JudgeDown, match=r"failed.*APIConnectionError reaching http://127\.0\.0\.1") as error:
        run(cfg, *tiny)
    assert dead_url in str(error.value) and API_KEY not in str(error.value)
    lines = read_lines(out / "judgements.jsonl")  # the chunk judged before the stop, asked again on a re-run
    assert len(lines) == 4 and all(j["process_reply"] is None for j in lines if j["reply"] is None)


def test_reasoning_checks_need_no_judge():
    """evaluation.set_metrics with the records: whether the reasoning leads to its answer, and (image_facts)
    whether it states the image rightly; computed from the saved completions, so resumed runs have them."""
    from pathvlm.evaluation import set_metrics

    brown = Record(id="b", image="b.png", question="Which stain dominates this patch?", options=OPTIONS, answer="A",
                   image_facts={"stain": "brown", "dab": 0.07, "hematoxylin": 0.01})
    completions = [
        "<think>The patch is mostly brown. Blue and mixed are ruled out. DAB marks the antigen brown.</think>"
        "<answer>A) brown</answer>",  # right about the image, leads to its answer
        "<think>The patch is mostly blue. Brown and mixed are ruled out.</think><answer>A) brown</answer>",  # neither
        "<think>Blue and mixed are ruled out.</think><answer>A) brown</answer>",  # agrees; says nothing of the image
        NO_THINK,  # no reasoning: agrees with nothing
    ]
    predictions = [{"completion": c, **score(c, brown), "completion_tokens": 30} for c in completions]
    metrics = set_metrics(predictions, [brown] * 4)
    assert metrics["reasoning_agrees"] == 0.5 and metrics["image_stated_right"] == 0.25
    no_facts = set_metrics(predictions, [RECORD] * 4)
    assert no_facts["image_stated_right"] is None and no_facts["reasoning_agrees"] == 0.5


def test_a_rerun_after_the_split_changed_rescores_and_judges_again(tiny, data, tmp_path):
    """After an evaluation the answer key is corrected (item 0: A -> B) and item 1's question rewritten. A re-run into
    the same output_dir rescores item 0's kept answer against the new key and has it judged again, answers item 1
    anew, and ends as a fresh evaluation of the same answers does; before, it reused every stored verdict."""
    split = os.path.join(os.path.dirname(data["pathmmu"]), "changing.jsonl")
    shutil.copy(data["pathmmu"], split)
    changing = {"pathmmu": split}
    out, fresh = tmp_path / "rerun", tmp_path / "fresh"
    write_predictions(out, changing, [WITH_THINK, NO_THINK])
    first = run(eval_cfg(changing, out, judge="rule", limit=2), *tiny)["sets"]["pathmmu"]
    assert first["correct"] == 2  # A) brown and B) blue, the keys A and B
    rows = [json.loads(line) for line in open(split)]
    rows[0]["answer"], rows[1]["question"] = "B", "Which stain is in this patch?"
    with open(split, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    again = run(eval_cfg(changing, out, judge="rule", limit=2), *tiny)["sets"]["pathmmu"]
    assert again["generated"] == 1  # item 1, whose question changed; item 0's answer is kept
    kept = {p["id"]: p for p in read_lines(out / "predictions.jsonl")}["pathmmu-000"]
    assert kept["completion"] == WITH_THINK and kept["correct"] is False and kept["gold"] == "B"
    write_predictions(fresh, changing, [WITH_THINK])
    truth = run(eval_cfg(changing, fresh, judge="rule", limit=1), *tiny)["sets"]["pathmmu"]
    verdicts = [j for j in read_lines(out / "judgements.jsonl") if j["id"] == "pathmmu-000"]
    assert len(verdicts) == 2  # judged again, on the new key
    [fresh_verdict] = read_lines(fresh / "judgements.jsonl")
    assert verdicts[-1]["process_score"] == fresh_verdict["process_score"] < verdicts[0]["process_score"]
    assert verdicts[-1]["scores"] == fresh_verdict["scores"]
    assert truth["correct"] == 0


def test_sigterm_while_judging_keeps_the_verdicts_so_far(data, server, tmp_path):
    """eval.py as its own process, judging answers already given, one item at a time against a judge that takes
    3 s a reply: a SIGTERM once the first verdict is written stops it with the message, the verdicts so far kept;
    the same command then judges only the rest."""
    import signal
    import subprocess
    import sys

    from test_sft import ROOT, signal_after_first_line

    server.state.mode = "slow"
    out = tmp_path / "eval"
    write_predictions(out, {"pathmmu": data["pathmmu"]}, [WITH_THINK, NO_THINK, WITH_THINK])
    args = [sys.executable, "eval.py", "configs/demo_eval.yaml", "model=tiny", f"sets=[pathmmu={data['pathmmu']}]",
            "limit=3", "judge=api", "judge_model=judge-test", f"judge_api_key_env={API_KEY_ENV}", "judge_concurrency=1",
            f"judge_base_url=http://127.0.0.1:{server.server_address[1]}/v1", f"output_dir={out}",
            f"judge_cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, API_KEY_ENV: API_KEY}
    code, err = signal_after_first_line(args, str(out / "judgements.jsonl"), signal.SIGTERM, env=env, timeout=120)
    assert code == 1 and "Traceback" not in err, err
    assert "stopped: the answers and judgements so far are kept in output_dir" in err
    kept = read_lines(out / "judgements.jsonl")
    assert 1 <= len(kept) < 3
    server.state.mode = "ok"
    resumed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{3 - len(kept)} to judge, {len(kept)} already in judgements.jsonl" in resumed.stdout
