"""PathVLM-R1's support modules, in layers. The scripts at the top level (train_sft.py, train_grpo.py,
eval.py, rewards.py) and the tools (tools/) stand on them; nothing here imports a top-level file.

A module imports only from its own layer or a lower one, never from a higher one, and no two modules
import each other, directly or round a circle. Imports inside functions count the same: a function-level
import is for a module that is slow or optional (unsloth), never a way round this rule.
tests/test_layers.py reads the table below and enforces it.

    layer 1  pure:    errors allowed config grpo images openqa records answers controls
    layer 2  model:   tiny model generation rollout sampler unsloth_backend
    layer 3  judges:  verdicts rule_judge judges reasoning
    layer 4  run:     checkpoint inputs training run evaluation provenance

Layer 1 holds no model: errors, the config and what it allows, the GRPO math, images, the record format
and the answer parser, which every other layer reads. Layer 2 loads the model and LoRA, samples (sampler.py) and
computes log-probs. Layer 3 asks judges and reads their verdicts (the self-judge asks the model), and holds eval.py's
reasoning rubric. Layer 4 is what
both loops and eval.py share: data order, optimizer, checkpoints, processes, a run's setup and teardown.

Why these directions: a student reading grpo.py or config.py needs nothing else open; the model code
never knows about rewards or judges, so it is the same for SFT, GRPO and eval; a judge may ask the
model (layer 2) but a model never asks a judge; and what a run shares (layer 4) may use everything
below it. The top level is layer 5: rewards.py (on verdicts and answers), the three scripts (on the
package and rewards.py, never each other), the tools, data/*/prepare.py and bench/. See docs/layers.md.
"""
