"""A child process for tests/test_distributed.py: runs train_sft / train_grpo / eval main() once or
several times in one process (alone, or as one of torchrun's), with what the tests arrange.

    python tests/dist_child.py grpo key=value ... [-- sft key=value ... [-- eval key=value ...]]

Arranged for GRPO (the loop itself is not changed): a `length` reward that varies within every group;
with SAMPLE_EACH_PROMPT=1, each prompt's group sampled from its own seed (the call and the prompt's
image), so that a prompt gives the same completions whichever process, and beside whichever other
prompts, samples it (a fresh run only: the call count restarts on resume); with KILL_RANK=r, process
r kills itself (SIGKILL) as it starts sampling its second step. With RECORD_GRADIENTS=1 (any loop),
process 0 saves the gradient each optimizer step is handed (summed over processes, clipped) to
<output_dir>/step_gradients.pt: a list over steps of lists over trainable parameters.
"""

import os
import signal
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import eval as eval_script  # noqa: E402
from pathvlm.inputs import InputError  # noqa: E402
from pathvlm.sampler import Completions  # noqa: E402
import rewards  # noqa: E402
import train_grpo  # noqa: E402
import train_sft  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

rewards.REWARDS["length"] = lambda completions, records, **_: [len(c) / 50 for c in completions]
sample_groups = train_grpo.sample_groups
calls = {"n": 0}


def sample_each_prompt_alone(model, processor, prompt, features, cfg):
    calls["n"] += 1
    if os.environ.get("KILL_RANK") == os.environ.get("RANK", "0") and calls["n"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    if not os.environ.get("SAMPLE_EACH_PROMPT"):
        return sample_groups(model, processor, prompt, features, cfg)
    pieces = []
    for b in range(prompt["input_ids"].shape[0]):
        one = {k: v[b:b + 1] for k, v in prompt.items() if k != "pixel_values"}
        image = features["image"].pooler_output[b]
        torch.manual_seed(calls["n"] * 1_000_003 + int(image.abs().sum().item() * 1000))
        pieces.append(sample_groups(model, processor, one,
                                    {"image": BaseModelOutputWithPooling(pooler_output=[image])}, cfg))
    width = max(out.ids.shape[1] for out, _ in pieces)

    def cat(key, value):
        return torch.cat([torch.nn.functional.pad(getattr(out, key), (0, width - out.ids.shape[1]), value=value)
                          for out, _ in pieces])
    logprobs = None if pieces[0][0].logprobs is None else cat("logprobs", 0.0)
    out = Completions(cat("ids", processor.tokenizer.pad_token_id), cat("mask", 0),
                      torch.cat([out.truncated for out, _ in pieces]), logprobs)
    return out, [t for _, texts in pieces for t in texts]


train_grpo.sample_groups = sample_each_prompt_alone


def record_into(steps: list):
    """An optimizer step pre-hook that appends the gradients the step is handed to `steps`."""
    def record(optimizer, _args, _kwargs):
        steps.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                      for group in optimizer.param_groups for p in group["params"]])
    return record


MAINS = {"grpo": train_grpo.main, "sft": train_sft.main, "eval": eval_script.main}

if __name__ == "__main__":
    runs, current = [], []
    for arg in sys.argv[1:] + ["--"]:
        if arg == "--":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    for script, *args in runs:
        steps = []
        record = os.environ.get("RECORD_GRADIENTS") and os.environ.get("RANK", "0") == "0"
        hook = register_optimizer_step_pre_hook(record_into(steps)) if record else None
        try:
            MAINS[script](args)
        except InputError as e:  # as the scripts' own __main__ blocks do
            sys.exit(f"error: {e}")
        if hook:
            hook.remove()
            out = next(a.removeprefix("output_dir=") for a in args if a.startswith("output_dir="))
            torch.save(steps, os.path.join(out, "step_gradients.pt"))
