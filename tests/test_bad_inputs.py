"""Bad inputs, each tried for real. What the user sees is a clear error naming the input, or a skip that is
counted where the user looks: never a traceback, never a silent drop. The table in docs/bad-inputs.md is this module's
output, with the messages the cases actually produced:

    python tests/test_bad_inputs.py --table

A script case runs the script's command line: its `__main__` block (runpy) in this process, as
`python train_sft.py ...` runs it, output captured. A real subprocess per case would cost ~5 s of imports
each on a small CPU; the cases marked `subprocess` run as one (the issue's own example, and the hub cases,
which need another environment). The data and config cases use the paper's 7B configs: the model cannot be
fetched here (HF_HUB_OFFLINE=1), so each one also shows its input is checked before the model loads.
Judge cases score a completion with the API judge against test_rewards.py's loopback chat server.
"""

import contextlib
import io
import json
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from PIL import Image

from conftest import HUB_CACHE, ROOT  # sets HF_HUB_OFFLINE=1 and a hub cache of the tests' own
from test_rewards import API_KEY, API_KEY_ENV, RECORD, WELL_FORMED, ChatHandler, api_judge, running_server

SFT = ["configs/sft.yaml", "eval_data=none"]
GRPO = ["configs/grpo.yaml", "init_adapter=none", "reference=base"]
EVAL = ["configs/eval.yaml"]
TINY_GRPO = ["configs/demo_grpo.yaml", "model=tiny", "init_adapter=none", "reference=base", "eval_every=0",
             "max_steps=1", "num_prompts=2", "group_size=2", "max_new_tokens=8"]
FAKE_KEY = "sk-proj-EXAMPLE0EXAMPLE0EXAMPLE0EXAMPLE0"  # an OpenAI key's shape, pasted where the variable's name goes


@dataclass
class Case:
    input: str  # the bad input, as the table names it
    expect: str  # regex: the line of output the user reads
    outcome: str = "error"  # error (exit 1) | skip (exit 0, counted) | counted (judge counters) | parsed
    script: str | None = None
    args: list[str] = field(default_factory=list)  # {ws}: this run's workspace, {out}: a fresh output_dir
    subprocess: bool = False
    env: dict = field(default_factory=dict)  # for a subprocess; {hub}: the loopback hub's URL
    judge: dict | None = None  # judge cases: api_judge settings, `mode` of the chat server, `handler`


JUDGE_COUNTED = "counted: judge/* in train_grpo's metrics.jsonl, eval.py's metrics.json"

CASES = [
    # data: a prepared split given to a script (the preparers' own cases are in test_data_real.py)
    Case("data file missing (configs/grpo.yaml before the PathMMU data is prepared)",
         r"^error: key 'data': data file not found: <tmp>/pathmmu/prepared/rl\.jsonl", script="train_grpo.py",
         args=["configs/grpo.yaml", "data={ws}/pathmmu/prepared/rl.jsonl", "output_dir={out}"], subprocess=True),
    Case("image of a record missing", r"^error: key 'data': .*1 images missing, e\.g\. <tmp>/missing_image/images/"
         r"r1\.png \(record 'r1'\)", script="train_sft.py", args=[*SFT, "data={ws}/missing_image/split.jsonl"]),
    Case("image of a record corrupt (a truncated PNG)", r"^error: key 'data': .*1 of 4 records cannot be used \('r1': "
         r"image unreadable: images/r1\.png", script="train_grpo.py",
         args=[*GRPO, "data={ws}/corrupt_image/split.jsonl"]),
    Case("image of a record is a truncated JPEG (Image.verify() passes it)", r"^error: key 'data': .*'r1': image "
         r"unreadable: images/r1\.jpg \(OSError: image file is truncated", script="train_sft.py",
         args=[*SFT, "data={ws}/truncated_jpeg/split.jsonl"]),
    Case("image of aspect ratio 500 (5000 x 10 px)", r"'r1': image too elongated: images/r1\.png is 5000x10 px",
         script="train_grpo.py", args=[*GRPO, "data={ws}/elongated_image/split.jsonl"]),
    Case("record with image: null", r":2: record 'r1': wrong type: 'image' is null, expected a string",
         script="train_sft.py", args=[*SFT, "data={ws}/image_null/split.jsonl"]),
    Case('record with options: "ABCD"', r":2: record 'r1': wrong type: 'options' is str 'ABCD', expected a list of "
         r"strings", script="eval.py", args=[*EVAL, "sets=[t={ws}/options_string/split.jsonl]"]),
    Case("record with a list as its id", r":2: record: wrong type: 'id' is list \['r', 1\], expected a string",
         script="train_grpo.py", args=[*GRPO, "data={ws}/id_list/split.jsonl"]),
    Case("answer not among the options", r"'r1': answer 'D' is not among the options", script="train_sft.py",
         args=[*SFT, "data={ws}/answer_not_an_option/split.jsonl"]),
    Case("fewer than 2 options", r"'r1': fewer than two options", script="train_grpo.py",
         args=[*GRPO, "data={ws}/one_option/split.jsonl"]),
    Case("two options the same after Unicode normalisation ('brown', 'brown' + a zero-width space)", r"'r1': two "
         r"options are the same text", script="train_sft.py", args=[*SFT, "data={ws}/same_options/split.jsonl"]),
    Case("an option with a line break (the prompt would show a phantom option 'D) purple')", r"'r1': option A holds a "
         r"line break or control character", script="train_grpo.py",
         args=[*GRPO, "data={ws}/newline_option/split.jsonl"]),
    Case("answer letter a Cyrillic look-alike of A", r"'r1': answer 'А' is not among the options: it is CYRILLIC "
         r"CAPITAL LETTER A \(U\+0410\), which looks like the Latin A but is not", script="train_sft.py",
         args=[*SFT, "data={ws}/lookalike_answer/split.jsonl"]),
    Case("empty question", r"'r1': empty question", script="train_sft.py",
         args=[*SFT, "data={ws}/empty_question/split.jsonl"]),
    Case("duplicate id", r"'r0': duplicate id", script="train_grpo.py",
         args=[*GRPO, "data={ws}/duplicate_id/split.jsonl"]),
    Case("duplicate id in a test set (would merge two predictions)", r"^error: key 'sets \(t\)': .*'r0': duplicate id",
         script="eval.py", args=[*EVAL, "sets=[t={ws}/duplicate_id/split.jsonl]"]),
    Case("split file not UTF-8 (Latin-1)", r"^error: key 'data': <tmp>/latin1/split\.jsonl is not UTF-8 text",
         script="train_sft.py", args=[*SFT, "data={ws}/latin1/split.jsonl"]),
    # config
    Case("misspelt key on the command line", r"^config error: command line: unknown config key 'grop_size' "
         r"\(did you mean 'group_size'\?\)", script="train_grpo.py", args=[*GRPO, "grop_size=4"]),
    Case("misspelt key in the YAML", r"^config error: <tmp>/misspelt\.yaml: unknown config key 'max_step' "
         r"\(did you mean 'max_steps'\?\)", script="train_sft.py", args=["{ws}/misspelt.yaml"]),
    Case("value of the wrong type", r"^config error: command line: key 'max_steps' must be an int, got 'ten'",
         script="train_sft.py", args=[*SFT, "max_steps=ten"]),
    Case("YAML file missing", r"^config error: config file not found: configs/sft_typo\.yaml", script="train_sft.py",
         args=["configs/sft_typo.yaml"]),
    Case("adapter directory missing", r"^error: key 'adapter': <tmp>/runs/nowhere does not exist", script="eval.py",
         args=[*EVAL, "sets=[t={ws}/good/split.jsonl]", "adapter={ws}/runs/nowhere"]),
    Case("adapter directory without an adapter (a run that never finished)", r"^error: key 'init_adapter': "
         r"<tmp>/empty_dir has no adapter_config\.json", script="train_grpo.py",
         args=["configs/grpo.yaml", "data={ws}/good/split.jsonl", "init_adapter={ws}/empty_dir"]),
    Case("a whole model given as the adapter", r"^error: key 'adapter': <tmp>/whole_model holds a whole model, not a "
         r"LoRA adapter: give it as model=", script="eval.py",
         args=[*EVAL, "sets=[t={ws}/good/split.jsonl]", "adapter={ws}/whole_model"]),
    Case("model directory missing", r"^error: model <tmp>/models/nowhere: no such local directory, and not a hub id",
         script="train_sft.py", args=[*SFT, "data={ws}/good/split.jsonl", "model={ws}/models/nowhere"]),
    Case("model directory without config.json", r"^error: model <tmp>/empty_dir: the directory has no config\.json",
         script="eval.py", args=[*EVAL, "sets=[t={ws}/good/split.jsonl]", "model={ws}/empty_dir"]),
    Case("output_dir is a file", r"^error: key 'output_dir': <tmp>/a_file\.txt is a file", script="train_sft.py",
         args=[*SFT, "data={ws}/good/split.jsonl", "output_dir={ws}/a_file.txt"]),
    Case("output_dir inside a file", r"^error: key 'output_dir': <tmp>/a_file\.txt is a file, so "
         r"output_dir=<tmp>/a_file\.txt/run cannot be a directory", script="train_grpo.py",
         args=[*GRPO, "data={ws}/good/split.jsonl", "output_dir={ws}/a_file.txt/run"]),
    Case("output_dir empty", r"^config error: command line: key 'output_dir' is empty: give it a value",
         script="train_sft.py", args=[*SFT, "output_dir="]),
    Case("output_dir on /proc", r"^error: key 'output_dir': /proc/pathvlm-run is in /proc, a file system the kernel "
         r"makes up, not a disk", script="eval.py", args=[*EVAL, "sets=[t={ws}/good/split.jsonl]",
                                                          "output_dir=/proc/pathvlm-run"]),
    Case("resume names a directory without a checkpoint", r"^error: key 'resume': no checkpoint at <tmp>/empty_dir "
         r"\(no state\.pt there\)", script="train_sft.py",
         args=[*SFT, "data={ws}/good/split.jsonl", "resume={ws}/empty_dir"]),
    Case("device=cuda on a machine without a GPU", r"^error: key 'device': device=cuda, but torch sees no CUDA GPU",
         script="train_sft.py", args=[*SFT, "device=cuda"], subprocess=True, env={"CUDA_VISIBLE_DEVICES": ""}),
    # config: each value checked as it is read (config.CHOICES, config.RANGES), before anything loads
    Case("misspelt reward name", r"^config error: command line: key 'rewards': unknown reward 'acuracy'; allowed: "
         r"format, accuracy, process \(did you mean 'accuracy'\?\)", script="train_grpo.py",
         args=[*GRPO, "rewards={format: 1, acuracy: 1}"]),
    Case("reward weight a string (YAML)", r"^config error: <tmp>/reward_string\.yaml: key 'rewards\.accuracy' must "
         r"be a number, got 'one'", script="train_grpo.py", args=["{ws}/reward_string.yaml", "reference=base"]),
    Case("reward weight a mapping", r"^config error: command line: key 'rewards\.format' must be a number, got "
         r"\{'weight': 1\}", script="train_grpo.py", args=[*GRPO, "rewards={format: {weight: 1}}"]),
    Case("every reward weight 0", r"^config error: rewards=\{'format': 0\.0, 'accuracy': 0\.0\}: name at least one "
         r"reward with a weight other than 0", script="train_grpo.py",
         args=[*GRPO, "rewards={format: 0, accuracy: 0}"]),
    Case("temperature=0 in GRPO", r"^config error: command line: key 'temperature' must be a finite number > 0, got "
         r"0\.0: GRPO samples its groups", script="train_grpo.py", args=[*GRPO, "temperature=0"]),
    Case("negative max_steps", r"^config error: command line: key 'max_steps' must be at least 1, got -3",
         script="train_sft.py", args=[*SFT, "max_steps=-3"]),
    Case("num_prompts=0", r"^config error: command line: key 'num_prompts' must be at least 1, got 0",
         script="train_grpo.py", args=[*GRPO, "num_prompts=0"]),
    Case("batch_size=0", r"^config error: command line: key 'batch_size' must be at least 1, got 0",
         script="eval.py", args=[*EVAL, "batch_size=0"]),
    Case("lr=nan", r"^config error: command line: key 'lr' must be a finite number > 0, got nan", script="train_sft.py",
         args=[*SFT, "lr=nan"]),
    Case("lr=inf", r"^config error: command line: key 'lr' must be a finite number > 0, got inf",
         script="train_grpo.py", args=[*GRPO, "lr=inf"]),
    Case("negative lr", r"^config error: command line: key 'lr' must be a finite number > 0, got -0\.0002",
         script="train_sft.py", args=[*SFT, "lr=-2e-4"]),
    Case("adam_beta2=1 (torch refuses it after the model loads)", r"^config error: command line: key 'adam_beta2' "
         r"must be a number >= 0 and < 1, got 1\.0", script="train_sft.py", args=[*SFT, "adam_beta2=1"]),
    Case("top_p above 1", r"^config error: command line: key 'top_p' must be a number > 0 and <= 1, got 1\.5",
         script="train_grpo.py", args=[*GRPO, "top_p=1.5"]),
    Case("group_size=1", r"^config error: command line: key 'group_size' must be at least 2, got 1: advantages "
         r"compare the completions of one prompt", script="train_grpo.py", args=[*GRPO, "group_size=1"]),
    Case("quantization=4-bit", r"^config error: command line: key 'quantization' must be one of none, 4bit, 8bit; "
         r"got '4-bit' \(did you mean '4bit'\?\)", script="train_sft.py", args=[*SFT, "quantization=4-bit"]),
    Case("misspelt optimizer (YAML)", r"^config error: <tmp>/optimizer\.yaml: key 'optimizer' must be one of adamw, "
         r"adamw_8bit, paged_adamw_8bit; got 'adamw8bit' \(did you mean 'adamw_8bit'\?\)", script="train_sft.py",
         args=["{ws}/optimizer.yaml"]),
    Case("misspelt device", r"^config error: command line: key 'device' must be one of auto, cpu, cuda, cuda:N; got "
         r"'gpu'", script="eval.py", args=[*EVAL, "device=gpu"]),
    Case("misspelt loss_type", r"^config error: command line: key 'loss_type' must be one of grpo, bnpo, dr_grpo, "
         r"dapo; got 'dr-grpo' \(did you mean 'dr_grpo'\?\)", script="train_grpo.py",
         args=[*GRPO, "loss_type=dr-grpo"]),
    Case("an API key pasted into judge_api_key_env (never shown)", r"^config error: command line: key "
         r"'judge_api_key_env' must name an environment variable \(like OPENAI_API_KEY\), not hold the key itself",
         script="train_grpo.py", args=[*GRPO, f"judge_api_key_env={FAKE_KEY}"]),
    Case("YAML key given twice", r"^config error: <tmp>/duplicate_key\.yaml, line 3: key 'max_steps' is given twice "
         r"\(first on line 1\)", script="train_sft.py", args=["{ws}/duplicate_key.yaml"]),
    Case("YAML syntax error", r"^config error: <tmp>/syntax_error\.yaml, line 2: not valid YAML: ",
         script="train_grpo.py", args=["{ws}/syntax_error.yaml"]),
    Case("YAML with a !!python/object tag", r"^config error: <tmp>/python_tag\.yaml, line 1: the tag "
         r"!!python/object/apply:os\.system is not read: a config holds plain values", script="train_sft.py",
         args=["{ws}/python_tag.yaml"]),
    Case("YAML not UTF-8 (Latin-1)", r"^config error: <tmp>/latin1\.yaml, line 2: not UTF-8 text \(byte 0xe9\): save "
         r"the file as UTF-8", script="eval.py", args=["{ws}/latin1.yaml"]),
    # prompt length
    Case("a prompt longer than max_prompt_len (image tokens included)", r"^<tmp>/long_prompt/split\.jsonl: dropped 1 "
         r"examples longer than max_prompt_len=400 tokens \(image tokens included", outcome="skip",
         script="train_grpo.py", args=[*TINY_GRPO, "data={ws}/long_prompt/split.jsonl", "max_prompt_len=400"]),
    Case("every prompt longer than max_prompt_len", r"^error: <tmp>/long_prompt/split\.jsonl: no examples left \(all 4 "
         r"longer than max_prompt_len=20\)", script="train_grpo.py",
         args=[*TINY_GRPO, "data={ws}/long_prompt/split.jsonl", "max_prompt_len=20"]),
    # model name
    Case("hub model not in the cache, HF_HUB_OFFLINE=1", r"^error: model Qwen/Qwen2\.5-VL-7B-Instruct: no such local "
         r"directory, and not in the hub cache \(<hub-cache>\), all that HF_HUB_OFFLINE=1 allows: download it once "
         r"with network", script="train_sft.py", args=[*SFT, "data={ws}/good/split.jsonl"]),
    Case("hub model gated (the hub answers 401 GatedRepo)", r"^error: model pathvlm-test/gated-model is gated on the "
         r"Hugging Face hub: accept its terms at <loopback>/pathvlm-test/gated-model, then log in with `hf auth login`",
         script="train_sft.py", args=[*SFT, "data={ws}/good/split.jsonl", "model=pathvlm-test/gated-model"],
         subprocess=True, env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "{hub}"}),
    Case("hub model misspelt (the hub answers 404 RepoNotFound)", r"^error: model Qwen/Qwen2\.5-VL-7B-Instuct: no such "
         r"local directory, and no such model on the Hugging Face hub: check the spelling", script="eval.py",
         args=[*EVAL, "sets=[t={ws}/good/split.jsonl]", "model=Qwen/Qwen2.5-VL-7B-Instuct"],
         subprocess=True, env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "{hub}"}),
    # files of the wrong kind, damaged or cut short (round 3): one error boundary per script (errors.run_script)
    Case("adapter trained on another model size", r"^error: adapter <tmp>/tiny_adapter does not fit model "
         r"\S+tiny-small-seed0: \S+lora_A\.weight is \[8, \d+\], the model's \[8, \d+\]; it was trained on another base "
         r"model", script="eval.py", args=[*EVAL, "sets=[t={ws}/good/split.jsonl]", "model=tiny-small",
                                             "adapter={ws}/tiny_adapter"]),
    Case("adapter file cut in half", r"^error: the adapter's weights <tmp>/cut_adapter/adapter_model\.safetensors "
         r"cannot be read \(SafetensorError: .*\): train or copy the adapter again", script="eval.py",
         args=[*EVAL, "sets=[t={ws}/good/split.jsonl]", "model=tiny", "adapter={ws}/cut_adapter"]),
    Case("model folder with config.json but no weights (a save cut short)", r"^error: model <tmp>/no_weights: "
         r"config\.json but no weights", script="eval.py",
         args=[*EVAL, "sets=[t={ws}/good/split.jsonl]", "model={ws}/no_weights"]),
    Case("resume names a checkpoint whose state.pt is cut short", r"^error: resume: the checkpoint <tmp>/cut_checkpoint "
         r"is incomplete \(BadZipFile: .*\): name an older one", script="train_sft.py",
         args=[*SFT, "data={ws}/good/split.jsonl", "model=tiny", "resume={ws}/cut_checkpoint"]),
    Case("PATHVLM_CACHE cannot be written (checked before output_dir is claimed)", r"^error: model=tiny is built once "
         r"into /proc/pathvlm-cache \(PATHVLM_CACHE.*which cannot be written", script="train_sft.py",
         args=[*SFT, "data={ws}/good/split.jsonl", "model=tiny"], subprocess=True,
         env={"PATHVLM_CACHE": "/proc/pathvlm-cache"}),
    Case("split is a FIFO (reading it would wait forever)", r"^error: key 'data': <tmp>/fifo\.jsonl is a FIFO \(named "
         r"pipe\), not a regular file", script="train_sft.py", args=[*SFT, "data={ws}/fifo.jsonl"]),
    Case("split is a directory", r"^error: key 'data': <tmp>/good is a directory, not a file", script="train_grpo.py",
         args=[*GRPO, "data={ws}/good"]),
    Case("split is a symbolic link loop", r"^error: key 'sets \(t\)': <tmp>/loop\.jsonl is a symbolic link loop",
         script="eval.py", args=[*EVAL, "sets=[t={ws}/loop.jsonl]"]),
    Case("image of a record is a directory", r"'r1': image images/r1\.png is a directory, not a file",
         script="train_sft.py", args=[*SFT, "data={ws}/image_dir/split.jsonl"]),
    Case("split with a zero-filled tail (NUL bytes)", r"^error: key 'data': <tmp>/nul_tail/split\.jsonl:5: NUL bytes in "
         r"the line: the file is damaged", script="train_sft.py", args=[*SFT, "data={ws}/nul_tail/split.jsonl"]),
    Case("path with ~ (expanded, as a shell would)", r"^error: key 'data': data file not found: <home>/pathvlm-no-"
         r"such-split\.jsonl", script="train_sft.py", args=[*SFT, "data=~/pathvlm-no-such-split.jsonl"]),
    Case("path with an environment variable that is not set", r"^config error: key 'output_dir': \$PATHVLM_NOT_SET/x "
         r"names the environment variable \$PATHVLM_NOT_SET, which is not set", script="train_sft.py",
         args=[*SFT, "output_dir=$PATHVLM_NOT_SET/x"]),
    Case("report.py given a training output_dir", r"^error: <tmp>/train_run is a training run's output_dir, not an "
         r"evaluation: evaluate it first", script="tools/report.py", args=["{ws}/train_run"]),
    Case("report.py on an older metrics.json without `sets`", r"^error: the evaluation <tmp>/old_eval/metrics\.json "
         r"cannot be read \(ValueError: no 'sets' in it", script="tools/report.py", args=["{ws}/old_eval"]),
    Case("report.py on a half-written metrics.json", r"^error: the evaluation <tmp>/half_eval/metrics\.json cannot be "
         r"read \(JSONDecodeError: .*\): evaluate again into that folder", script="tools/report.py",
         args=["{ws}/half_eval"]),
    Case("report.py --out naming a file", r"^error: --out <tmp>/a_file\.txt is a file: give a directory",
         script="tools/report.py", args=["{ws}/old_eval", "--out", "{ws}/a_file.txt"]),
    Case("eval resumed into a folder whose config.yaml is damaged", r"^error: the earlier evaluation's config "
         r"<tmp>/eval_bad_config/config\.yaml cannot be read \(ParserError", script="eval.py",
         args=[*EVAL, "sets=[t={ws}/good/split.jsonl]", "output_dir={ws}/eval_bad_config"]),
    Case("eval resumed into a folder whose predictions.jsonl has a damaged line", r"^error: the predictions "
         r"<tmp>/eval_bad_line/predictions\.jsonl cannot be read \(ValueError: .*:1: not valid JSON\): fix or delete",
         script="eval.py", args=["configs/demo_eval.yaml", "model=tiny", "sets=[t={ws}/good/split.jsonl]",
                                 "output_dir={ws}/eval_bad_line"]),
    Case("PATHVLM_CACHE names a file", r"^error: model=tiny is built once into <tmp>/a_file\.txt \(PATHVLM_CACHE.*which "
         r"is a file, not a directory", script="train_sft.py", args=[*SFT, "data={ws}/good/split.jsonl", "model=tiny"],
         subprocess=True, env={"PATHVLM_CACHE": "{ws}/a_file.txt"}),
    Case("adapter is a checkpoint folder (its adapter is in model/)", r"^error: key 'adapter': <tmp>/a_checkpoint has no "
         r"adapter_config\.json; it is a checkpoint, whose adapter is <tmp>/a_checkpoint/model: give that",
         script="eval.py", args=[*EVAL, "sets=[t={ws}/good/split.jsonl]", "adapter={ws}/a_checkpoint"]),
    Case("report.py given one evaluation twice", r"^error: <tmp>/old_eval/ is given twice: give each evaluation once",
         script="tools/report.py", args=["{ws}/old_eval", "{ws}/old_eval/"]),
    # bounded inputs: sizes capped before the work that would take minutes or all memory
    Case("YAML alias bomb (nine levels of ten aliases: 10^9 values)", r"^config error: <tmp>/alias_bomb\.yaml: its "
         r"aliases \(&name, \*name\) expand to more than 100,000 values", script="train_sft.py",
         args=["{ws}/alias_bomb.yaml"]),
    Case("YAML of 3 MB (a mapping of 200,000 keys)", r"^config error: <tmp>/big\.yaml: [\d,]+ bytes, more than a config "
         r"holds", script="train_sft.py", args=["{ws}/big.yaml"]),
    Case("a 5,000-character value quoted in a message", r"^config error: command line: key 'lr' must be a number, got "
         r"'x{119}\.\.\. \(5,002 characters\)$", script="train_sft.py", args=[*SFT, "lr=" + "x" * 5000]),
    Case("eval: a question of 100,000 characters (a 50 MB one ran out of memory)", r"^note: t: 1 item\(s\) skipped, "
         r"their prompt over max_prompt_len=8192 tokens: r1", outcome="skip", script="eval.py",
         args=["configs/demo_eval.yaml", "sets=[t={ws}/huge_question/split.jsonl]", "max_new_tokens=4"]),
    # held-out data (inputs.check_heldout_apart)
    Case("eval_data is the training split (SFT's held-out loss)", r"^error: key 'eval_data': 4 of 4 records in "
         r"<tmp>/good/split\.jsonl show an image that the training split <tmp>/good/split\.jsonl \(key 'data'\) also "
         r"holds", script="train_sft.py", args=[*SFT, "data={ws}/good/split.jsonl", "eval_data={ws}/good/split.jsonl"]),
    Case("eval_data holds a training image under another name (GRPO's curve)", r"^error: key 'eval_data': 1 of 4 "
         r"records in <tmp>/renamed/split\.jsonl show an image that the training split <tmp>/good/split\.jsonl",
         script="train_grpo.py", args=[*TINY_GRPO, "data={ws}/good/split.jsonl", "eval_data={ws}/renamed/split.jsonl",
                                       "eval_every=1"]),
    # the research tools, before their first stage
    Case("ablate.py --seeds 0 0 (one model averaged twice)", r"^error: --seeds: 0 given twice: each seed is one "
         r"trained model", script="tools/ablate.py", args=["configs/ablations/demo.yaml", "--seeds", "0", "0", "--out",
                                                           "{out}"]),
    Case("ablate.py --seeds -1 (failed only in the first script it reached)", r"^error: --seeds: key 'seed' must be an "
         r"int between 0 and 2147483647, got -1", script="tools/ablate.py",
         args=["configs/ablations/demo.yaml", "--seeds", "-1", "--out", "{out}"]),
    Case("ablate.py: a variant's data file missing (every variant, every seed, before any run)", r"^error: "
         r"<tmp>/ablate_missing\.yaml: files not found, before any run: .*train_grpo\.py data: <tmp>/nowhere\.jsonl "
         r"\('other data'\)", script="tools/ablate.py", args=["{ws}/ablate_missing.yaml", "--seeds", "0", "--out",
                                                              "{out}"]),
    Case("ablate.py --power --shared 1.5 (a correlation; a math domain error deep in the simulator)", r"^error: "
         r"--power: --shared must be between 0 and 1, got 1\.5", script="tools/ablate.py",
         args=["--power", "--shared", "1.5"]),
    Case("ablate.py --power --sims 0 (every power nan)", r"^error: --power: --sims must be between 1 and 1000000, "
         r"got 0", script="tools/ablate.py", args=["--power", "--sims", "0"]),
    Case("audit_judge.py --items -1 (records[:-1] dropped the last item)", r"error: argument --items: must be at least "
         r"1 \(the split's first N items\), got -1", script="tools/audit_judge.py",
         args=["configs/demo_grpo.yaml", "judge=rule", "data={ws}/good/split.jsonl", "--items", "-1"]),
    # judge
    Case("judge API key variable not set", r"^error: judge=api reads its key from the environment variable "
         r"PATHVLM_UNSET_KEY, which is not set", script="train_grpo.py",
         args=[*GRPO, "data={ws}/good/split.jsonl", "judge=api", "judge_api_key_env=PATHVLM_UNSET_KEY"]),
    Case("judge reply is not JSON (garbage)", r"^reward 0; judge/fallbacks=1$", outcome="counted",
         judge={"mode": "garbage"}),
    Case("judge reply is JSON inside a markdown code fence", r"^reward 0\.7; nothing counted$", outcome="parsed",
         judge={"mode": "good", "handler": "fenced"}),
    Case("judge reply is an HTML page with status 200", r"^reward 0; judge/retries=2, judge/failures=1, "
         r"judge/fallbacks=1$", outcome="counted", judge={"mode": "html"}),
    Case("judge reply is cut-off JSON", r"^reward 0; judge/retries=2, judge/failures=1, judge/fallbacks=1$",
         outcome="counted", judge={"mode": "cutoff"}),
    Case("judge scores on a 0-10 scale (7)", r"^reward 0; judge/fallbacks=1$", outcome="counted",
         judge={"mode": "seven"}),
    Case('judge scores as "80%"', r"^reward 0; judge/fallbacks=1$", outcome="counted", judge={"mode": "percent"}),
    Case("judge reply is empty", r"^reward 0; judge/fallbacks=1$", outcome="counted", judge={"mode": "empty"}),
    Case("judge API answers 429, then 200", r"^reward 0\.7; judge/retries=1$", outcome="counted",
         judge={"mode": "429_then_ok"}),
    Case("judge API answers 500 every time", r"^reward 0; judge/retries=2, judge/failures=1, judge/fallbacks=1$",
         outcome="counted", judge={"mode": "500"}),
    Case("judge API times out", r"^reward 0; judge/retries=1, judge/failures=1, judge/fallbacks=1$",
         outcome="counted", judge={"mode": "slow", "timeout": 0.3, "max_retries": 1}),
    Case("judge API connection refused", r"^reward 0; judge/retries=1, judge/failures=1, judge/fallbacks=1$",
         outcome="counted", judge={"mode": "refused", "max_retries": 1}),
    Case("judge API refuses the key (401)", r"^error: judge API at <loopback>/v1 answered HTTP 401 "
         r"\(AuthenticationError\) for model 'judge-test': check the URL, the model name and the key",
         judge={"mode": "401"}),
]


# ----------------------------------------------------------------------------------------------
# The workspace: a valid prepared split, one broken copy per data case, and the other bad paths

def write_split(directory: str, records: list[dict], encoding: str = "utf-8"):
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    for r in records:
        image = Image.new("RGB", (112, 112), (150, 90, 40))  # DAB brown
        image.paste((60, 70, 160), (0, 0, 56, 112))  # hematoxylin blue on the left half
        image.save(os.path.join(directory, r["image"]))
    with open(os.path.join(directory, "split.jsonl"), "w", encoding=encoding) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def make_workspace(ws: str):
    def records(**changes_to_r1):
        out = [dict(id=f"r{i}", image=f"images/r{i}.png", question="Which stain dominates this patch?",
                    options=["brown", "blue", "mixed"], answer="A", explanation="The patch is mostly brown.")
               for i in range(4)]
        out[1].update(changes_to_r1)
        return out

    write_split(f"{ws}/good", records())
    write_split(f"{ws}/missing_image", records())
    os.remove(f"{ws}/missing_image/images/r1.png")
    write_split(f"{ws}/corrupt_image", records())
    png = Path(f"{ws}/corrupt_image/images/r1.png")
    png.write_bytes(png.read_bytes()[:60])  # cut inside its pixel data, as an interrupted copy leaves it
    write_split(f"{ws}/truncated_jpeg", records(image="images/r1.jpg"))
    jpeg = io.BytesIO()
    Image.effect_noise((112, 112), 64).convert("RGB").save(jpeg, format="JPEG", quality=90)
    Path(f"{ws}/truncated_jpeg/images/r1.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
    write_split(f"{ws}/elongated_image", records())
    Image.new("RGB", (5000, 10), (150, 90, 40)).save(f"{ws}/elongated_image/images/r1.png")
    write_split(f"{ws}/image_null", records())
    write_split(f"{ws}/options_string", records())
    write_split(f"{ws}/id_list", records())
    for name, changes in [("image_null", {"image": None}), ("options_string", {"options": "ABCD"}),
                          ("id_list", {"id": ["r", 1]})]:  # written over the split, the images stay
        rows = [json.loads(line) for line in open(f"{ws}/{name}/split.jsonl")]
        rows[1].update(changes)
        Path(f"{ws}/{name}/split.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_split(f"{ws}/answer_not_an_option", records(answer="D"))
    write_split(f"{ws}/one_option", records(options=["brown"]))
    write_split(f"{ws}/empty_question", records(question=" "))
    write_split(f"{ws}/same_options", records(options=["brown", "brown\u200b", "blue"]))
    write_split(f"{ws}/newline_option", records(options=["brown\nD) purple", "blue", "mixed"]))
    write_split(f"{ws}/lookalike_answer", records(answer="\u0410"))
    write_split(f"{ws}/duplicate_id", records(id="r0"))
    write_split(f"{ws}/latin1", records(question="Which stain dominates this café-au-lait patch?"), encoding="latin-1")
    write_split(f"{ws}/long_prompt", records(question="Which stain dominates this patch? " * 60))
    write_split(f"{ws}/image_dir", records())
    os.remove(f"{ws}/image_dir/images/r1.png")
    os.makedirs(f"{ws}/image_dir/images/r1.png")
    write_split(f"{ws}/nul_tail", records())
    with open(f"{ws}/nul_tail/split.jsonl", "ab") as f:  # what a crash mid-write leaves on some file systems
        f.write(b"\0" * 512)
    os.mkfifo(f"{ws}/fifo.jsonl")
    os.symlink(f"{ws}/loop.jsonl", f"{ws}/loop.jsonl")
    make_model_files(ws)
    write_split(f"{ws}/huge_question", records(question="Which stain dominates this patch? " * 3000))
    write_split(f"{ws}/renamed", [{**r, "id": f"h{i}", "image": f"images/h{i}.png"} for i, r in enumerate(records())])
    for i, colour in enumerate([(20, 200, 90), (90, 20, 200), (200, 200, 20)], 1):  # h0 keeps write_split's image,
        Image.new("RGB", (112, 112), colour).save(f"{ws}/renamed/images/h{i}.png")  # good's under another name
    Path(f"{ws}/alias_bomb.yaml").write_text('a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
                                             + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n"
                                                       for p, n in zip("abcdefgh", "bcdefghi")))
    os.makedirs(f"{ws}/eval_bad_config")
    Path(f"{ws}/eval_bad_config/config.yaml").write_text("model: [tiny\n")  # cut inside a list
    Path(f"{ws}/eval_bad_config/predictions.jsonl").write_text('{"id": "r0"}\n')
    os.makedirs(f"{ws}/eval_bad_line")
    Path(f"{ws}/eval_bad_line/config.yaml").write_text("{}\n")
    Path(f"{ws}/eval_bad_line/predictions.jsonl").write_text('{"id": "r0", "se\n{"id": "r1"}\n')
    shutil.copytree(f"{ws}/tiny_adapter", f"{ws}/a_checkpoint/model")
    Path(f"{ws}/big.yaml").write_text("run_name:\n" + "".join(f"  k{i}: {i}\n" for i in range(200_000)))
    Path(f"{ws}/ablate_missing.yaml").write_text(json.dumps({  # JSON is YAML
        "variants": {"baseline": {}, "other data": {"data": f"{ws}/nowhere.jsonl"}},
        "defaults": {"sft": {"model": "tiny", "data": f"{ws}/good/split.jsonl", "eval_data": None},
                     "grpo": {"data": f"{ws}/good/split.jsonl", "eval_data": None},
                     "eval": {"sets": [f"t={ws}/good/split.jsonl"]}}}))
    for name, text in [("old_eval", '{"accuracy": 0.5}'), ("half_eval", '{"sets": {"t": {"accuracy": 0.5')]:
        os.makedirs(f"{ws}/{name}")
        Path(f"{ws}/{name}/metrics.json").write_text(text)
    os.makedirs(f"{ws}/train_run")
    Path(f"{ws}/train_run/metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    os.makedirs(f"{ws}/empty_dir")
    os.makedirs(f"{ws}/whole_model")
    Path(f"{ws}/whole_model/config.json").write_text("{}")
    Path(f"{ws}/a_file.txt").write_text("not a directory\n")
    Path(f"{ws}/misspelt.yaml").write_text("max_step: 10\n")
    Path(f"{ws}/reward_string.yaml").write_text("rewards: {format: 1, accuracy: one}\n")
    Path(f"{ws}/optimizer.yaml").write_text("optimizer: adamw8bit\n")
    Path(f"{ws}/duplicate_key.yaml").write_text("max_steps: 100\nlr: 1.0e-4\nmax_steps: 200\n")
    Path(f"{ws}/syntax_error.yaml").write_text("max_steps: [100\nlr: 1.0e-4\n")
    Path(f"{ws}/python_tag.yaml").write_text("max_steps: !!python/object/apply:os.system ['echo run']\n")
    Path(f"{ws}/latin1.yaml").write_text("model: tiny\nrun_name: café\n", encoding="latin-1")


def make_model_files(ws: str):
    """A LoRA adapter saved for the tiny model, the same cut in half, a model folder whose weights never came,
    and a checkpoint whose state.pt was cut short."""
    from pathvlm.config import ModelConfig
    from pathvlm.model import load_model
    from pathvlm.run import save_trained

    model, processor = load_model(ModelConfig(model="tiny"))
    save_trained(model, processor, f"{ws}/tiny_adapter")
    shutil.copytree(f"{ws}/tiny_adapter", f"{ws}/cut_adapter")
    weights = Path(f"{ws}/cut_adapter/adapter_model.safetensors")
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    os.makedirs(f"{ws}/no_weights")
    shutil.copy(os.path.join(model.base_model.model.config._name_or_path, "config.json"), f"{ws}/no_weights")
    os.makedirs(f"{ws}/cut_checkpoint")
    Path(f"{ws}/cut_checkpoint/loop.json").write_text('{"step": 1}')
    Path(f"{ws}/cut_checkpoint/state.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a zip's start, no more


# ----------------------------------------------------------------------------------------------
# Running a case

@dataclass
class Result:
    rc: int | None = None
    output: str = ""
    traceback: str | None = None  # an exception that reached the top: what the user would see as a traceback


class HubHandler(BaseHTTPRequestHandler):
    """The Hugging Face hub's answers for a gated repository and for one that does not exist: the status and
    X-Error-Code header from which huggingface_hub raises GatedRepoError / RepositoryNotFoundError."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        gated = "gated" in self.path
        self.send_response(401 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("X-Error-Message", "Access to this model is restricted" if gated else "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD


class FencedReplyHandler(ChatHandler):
    """test_rewards' chat server, its reply wrapped in a ```json fence as chat models often write it."""

    def send_json(self, status: int, obj: dict):
        if status == 200:
            message = obj["choices"][0]["message"]
            message["content"] = f"```json\n{message['content']}\n```"  # the fence alone: prose around it fails
        super().send_json(status, obj)


def run_script(script: str, argv: list[str]) -> Result:
    """`python script argv...` in this process: its __main__ block, stdout and stderr captured, and an
    uncaught SystemExit read as the interpreter reads it (a string is printed, exit status 1)."""
    out, saved_argv = io.StringIO(), sys.argv
    sys.argv = [script, *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        return Result(0, out.getvalue())
    except SystemExit as e:
        if isinstance(e.code, str):
            return Result(1, out.getvalue() + e.code + "\n")
        return Result(e.code or 0, out.getvalue())
    finally:
        sys.argv = saved_argv


def run_judge(settings: dict, ws: str) -> Result:
    """The process reward of one well-formed, right completion, as train_grpo scores it -> the reward and the
    judge's counters that moved. An InputError is printed as the scripts print it."""
    from pathvlm.inputs import InputError
    from rewards import process_reward

    settings = dict(settings)
    mode, handler = settings.pop("mode"), settings.pop("handler", None)
    with running_server(FencedReplyHandler if handler == "fenced" else ChatHandler) as server:
        server.state.mode = mode
        if mode == "refused":  # a port nothing listens on
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                settings["base_url"] = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        judge = api_judge(server, Path(ws), use_cache=False, **settings)
        try:
            [reward] = process_reward([WELL_FORMED], [RECORD], judge=judge, image_paths=[f"{ws}/good/images/r0.png"])
        except InputError as e:
            return Result(1, f"error: {e}\n")
    counted = [f"judge/{k}={v}" for k, v in judge.stats.as_dict().items() if k in ("retries", "failures", "fallbacks")
               and v]
    return Result(0, f"reward {reward:g}; {', '.join(counted) or 'nothing counted'}\n")


def fill(text: str, ws: str, case_index: int, hub: str = "") -> str:
    """The placeholders filled in; other braces (`rewards={format: 1}`) are the case's own YAML."""
    for name, value in [("ws", ws), ("out", f"{ws}/out/{case_index}"), ("hub", hub)]:
        text = text.replace("{" + name + "}", value)
    return text


def script_args(case: Case, ws: str, case_index: int) -> list[str]:
    """The case's arguments, filled in, with output_dir in the workspace unless the case names one: a
    run that got as far as saving its config must never write into the repository's runs/."""
    args = [fill(a, ws, case_index) for a in case.args]
    if case.script in ("tools/report.py", "tools/ablate.py"):  # argparse options, no output_dir key
        return args
    return args if any(a.startswith("output_dir=") for a in args) else [*args, f"output_dir={ws}/out/{case_index}"]


def run_cases(ws: str) -> dict[str, Result]:
    """Every case -> its Result. Subprocess cases start first and run while the others run here."""
    make_workspace(ws)
    results, started, cwd = {}, {}, os.getcwd()
    os.chdir(ROOT)  # the scripts' config paths are relative to the repository
    os.environ[API_KEY_ENV] = API_KEY
    try:
        with running_server(HubHandler) as hub:
            hub_url = f"http://127.0.0.1:{hub.server_address[1]}"
            for i, case in enumerate(CASES):
                if case.subprocess:
                    env = {**os.environ, **{k: fill(v, ws, i, hub_url) for k, v in case.env.items()}}
                    started[case.input] = subprocess.Popen(
                        [sys.executable, case.script, *script_args(case, ws, i)], cwd=ROOT, env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i, case in enumerate(CASES):
                if case.subprocess:
                    continue
                try:
                    if case.judge is not None:
                        results[case.input] = run_judge(case.judge, ws)
                    else:
                        results[case.input] = run_script(case.script, script_args(case, ws, i))
                except Exception:
                    results[case.input] = Result(traceback=traceback.format_exc())
            for name, proc in started.items():
                output, _ = proc.communicate(timeout=300)
                results[name] = Result(proc.returncode, output)
    finally:
        for proc in started.values():
            proc.kill()  # a no-op for those that have exited; one that timed out does not outlive the test
        os.chdir(cwd)
        os.environ.pop(API_KEY_ENV, None)
    for result in results.values():  # what is machine-specific, as docs/bad-inputs.md shows it
        for path, placeholder in [(os.path.realpath(ws), "<tmp>"), (ws, "<tmp>"), (HUB_CACHE, "<hub-cache>"),
                                  (os.path.expanduser("~"), "<home>")]:
            result.output = result.output.replace(path, placeholder)
        result.output = re.sub(r"http://127\.0\.0\.1:\d+", "<loopback>", result.output)
    return results


def message_line(case: Case, result: Result) -> str | None:
    """The line of the output the case expects (the table's 'what the user sees'), or None."""
    return next((line for line in result.output.splitlines() if re.search(case.expect, line)), None)


# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_cases(str(tmp_path_factory.mktemp("bad-inputs")))


@pytest.mark.parametrize("case", CASES, ids=[c.input for c in CASES])
def test_bad_input(case, results):
    result = results[case.input]
    assert result.traceback is None, result.traceback
    assert "Traceback" not in result.output, result.output
    assert FAKE_KEY not in result.output, "a pasted key was shown"
    assert message_line(case, result) is not None, f"no line matches /{case.expect}/ in:\n{result.output}"
    assert (result.rc != 0) == (case.outcome == "error"), f"exit status {result.rc}:\n{result.output}"


WHERE = {"error": "error, exit 1", "skip": "counted skip (stdout, before step 1), exit 0",
         "counted": JUDGE_COUNTED, "parsed": "parsed as a reply"}


def table(results: dict[str, Result]) -> str:
    rows = ["| bad input | command | what the user sees | outcome |", "|---|---|---|---|"]
    tally = {"error": 0, "skip": 0, "counted": 0, "parsed": 0, "traceback": 0, "unexpected": 0}
    for i, case in enumerate(CASES):
        result = results[case.input]
        line = message_line(case, result)
        if result.traceback is not None or "Traceback" in result.output:
            tally["traceback"] += 1
        elif line is None or (result.rc != 0) != (case.outcome == "error"):
            tally["unexpected"] += 1
        else:
            tally[case.outcome] += 1
        command = "(judge: process reward)" if case.script is None else f"`{case.script} {' '.join(case.args)}`"
        command = command.replace("{ws}", "<tmp>").replace("{out}", "<tmp>/out")
        seen = line if line is not None else (result.traceback or result.output).strip().splitlines()[-1]
        cells = [case.input, command, f"`` {seen} ``", WHERE[case.outcome]]  # `` : the messages quote commands in `
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    rows.append("")
    rows.append(f"{len(CASES)} inputs tried: {tally['error']} clear errors, {tally['skip']} counted skips, "
                f"{tally['counted']} counted judge failures or retries, {tally['parsed']} parsed; "
                f"{tally['traceback']} tracebacks, {tally['unexpected']} other outcomes.")
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:] != ["--table"]:
        sys.exit("usage: python tests/test_bad_inputs.py --table")
    workspace = tempfile.mkdtemp(prefix="pathvlm-bad-inputs-")
    os.environ["PATHVLM_CACHE"] = os.path.join(workspace, "cache")  # the tiny model, as conftest does for pytest
    try:
        print(table(run_cases(workspace)))
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
