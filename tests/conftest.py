import atexit
import json
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# No test reaches a model hub: a model named by hub id resolves from this hub cache, which the tests
# write themselves (hub_model below). Set before anything imports huggingface_hub, which reads them once.
HUB_CACHE = tempfile.mkdtemp(prefix="pathvlm-hub-")
atexit.register(shutil.rmtree, HUB_CACHE, ignore_errors=True)
os.environ["HF_HUB_CACHE"] = HUB_CACHE
os.environ["HF_HUB_OFFLINE"] = "1"

HUB_ID = "pathvlm-test/Qwen2.5-VL-tiny-Instruct"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The tiny model is built into a per-session cache, never the user's."""
    os.environ.setdefault("PATHVLM_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small demo dataset made by the real preparation script (real IHC patches)."""
    from data.demo.prepare import main

    out = tmp_path_factory.mktemp("demo")
    main(["--out", str(out), "--sft-size", "48", "--rl-size", "24", "--test-size", "24"])
    return str(out)


def real_generation_config(tokenizer) -> dict:
    """Qwen2.5-VL-7B-Instruct's generation_config.json as public reports give it (a greedy-like
    sampler: top_k 1, top_p 0.001, temperature 0.1, repetition penalty 1.05, and two EOS ids,
    <|im_end|> and <|endoftext|>), with this tokenizer's ids for those tokens."""
    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    return {"bos_token_id": endoftext, "pad_token_id": endoftext, "do_sample": True, "eos_token_id": [im_end, endoftext],
            "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}


@pytest.fixture(scope="session")
def hub_model():
    """The tiny model as a real-shaped checkpoint: saved into the offline hub cache in the layout
    huggingface_hub resolves (models--<org>--<name>/refs/main -> snapshots/<revision>/), under an
    org/name id, with the real checkpoint's generation settings. Load it by that id, as the 7B is."""
    from pathvlm.tiny import resolve_model_path

    repo = os.path.join(HUB_CACHE, "models--" + HUB_ID.replace("/", "--"))
    revision = "0" * 40
    snapshot = os.path.join(repo, "snapshots", revision)
    if not os.path.isdir(snapshot):
        shutil.copytree(resolve_model_path("tiny"), snapshot)
        from transformers import AutoTokenizer

        with open(os.path.join(snapshot, "generation_config.json"), "w") as f:
            json.dump(real_generation_config(AutoTokenizer.from_pretrained(snapshot)), f, indent=1)
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write(revision)
    return HUB_ID
