"""Optional `backend: unsloth`: Unsloth's FastVisionModel loader with our training loops (GPU only).

Unsloth patches transformers for faster, leaner LoRA training on NVIDIA GPUs. It refuses to import
without one, and installing it replaces the CPU torch, so it is never in requirements.txt:
    pip install unsloth        (on a CUDA machine; see docs/gpu.md)
We check both conditions first, so a missing GPU or package is one clear line, not a crash inside
Unsloth.
"""

import torch


def load_unsloth_model(cfg, path: str, adapter: str | None, trainable: bool):
    if not torch.cuda.is_available():
        raise SystemExit("backend=unsloth needs a CUDA GPU (none found); use backend=hf")
    try:
        from unsloth import FastVisionModel
    except ImportError:
        raise SystemExit("backend=unsloth needs `pip install unsloth` (GPU only); or use backend=hf") from None
    if cfg.quantization == "8bit":
        raise SystemExit("backend=unsloth supports quantization none or 4bit")
    model, _ = FastVisionModel.from_pretrained(
        adapter or path, load_in_4bit=cfg.quantization == "4bit",
        use_gradient_checkpointing="unsloth" if cfg.gradient_checkpointing else False)
    if adapter is None:
        # the paper's split: LoRA on the language model, the vision tower frozen
        model = FastVisionModel.get_peft_model(
            model, finetune_vision_layers=False, finetune_language_layers=True, finetune_attention_modules=True,
            finetune_mlp_modules=True, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            random_state=cfg.seed)
    if trainable:
        FastVisionModel.for_training(model)
    else:
        FastVisionModel.for_inference(model)
    return model  # model.load_model loads the processor beside it
