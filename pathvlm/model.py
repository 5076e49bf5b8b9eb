"""Qwen2.5-VL loaded: a hub id, a local directory or the embedded `tiny`, with its processor and LoRA.

The 7B and the tiny model go through the same code: `tiny` is built from a config (tiny.py), saved
once to a cache directory, and from then on loaded with `from_pretrained` like any checkpoint, so
quantisation, LoRA and generation are exercised exactly as on the real model. What runs the loaded
model (inputs, generation) is generation.py's; the training loops' own machinery (a group's sampling
with one prefill, chunked log-probs) is rollout.py's.
"""

import contextlib
import logging
import os
import warnings

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from pathvlm.errors import BadInput, MissingInput, reading
from pathvlm.tiny import CHAT_TEMPLATE, TINY_SIZES, resolve_model_path

# On CPUs with AVX512-BF16, importing bitsandbytes (peft does) tries to fetch an inference kernel from the
# Hugging Face hub with the `kernels` package and warns when it cannot. We never run that kernel (see
# keep_one_4bit_layout), and nothing may be downloaded at run time, so the warning only misleads.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft 0.21's PeftModel.__init__ reads model.is_gradient_checkpointing, which transformers 5 deprecated for
# is_activation_checkpointing: a FutureWarning on every run about code not ours (until peft reads the new name).
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class _GreedyTopKFilter(logging.Filter):
    """generation_config gives top_k=0 for greedy decoding too: left at its default (50), top_k would be
    replaced by the model's own (Qwen2.5-VL-Instruct ships top_k=1), so it is set, and transformers then warns
    that greedy decoding ignores it, which is the point. Only that warning is dropped; others about flags stay."""

    def filter(self, record):
        return not record.getMessage().startswith("The following generation flags are not valid and may be "
                                                  "ignored: ['top_k'].")


logging.getLogger("transformers.generation.configuration_utils").addFilter(_GreedyTopKFilter())

# LoRA goes on the language model only: the vision blocks reuse the names q_proj/.../down_proj,
# so we match on the module path, not on the name alone.
LORA_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# With train_vision under LoRA, the tower is one of PEFT's `modules_to_save`: PEFT trains a copy of it and
# saves that copy inside the adapter, so every PeftModel.from_pretrained of the adapter (train_grpo.py,
# eval.py, merge_export, plain PEFT) gets the trained tower back. Matched as the end of the module path.
VISION_TOWER = "model.visual"


# ----------------------------------------------------------------------------------------------
# Processor: Qwen2.5-VL's, without the video processor (it needs torchvision, which does not import
# beside the CPU torch; AutoProcessor then silently returns a bare tokenizer)

class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


def load_processor(path: str, min_pixels: int, max_pixels: int) -> ImageOnlyQwen2_5_VLProcessor:
    """path: a local directory or a hub id (`Qwen/Qwen2.5-VL-7B-Instruct`), as from_pretrained takes it."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # batched generation appends to the right end of every row
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                               patch_size=14, temporal_patch_size=2, merge_size=2)
    return ImageOnlyQwen2_5_VLProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)


# ----------------------------------------------------------------------------------------------
# Model loading

# device=auto refuses to put a model bigger than this on the CPU: a 7B config on a machine whose GPU
# is not visible (driver, CUDA_VISIBLE_DEVICES, a CPU build of torch) would otherwise load for many minutes
# in fp32 and train at seconds per token instead of stopping with the reason. The tiny models are ~1e6.
CPU_AUTO_MAX_PARAMS = 1e9


def check_model(name: str):
    """Stop with one message, before any weights load, when `model` names nothing loadable: a directory
    without config.json, or a hub id that is misspelt, gated, or neither in the hub cache nor reachable.
    Fetches config.json alone (a few KB); huggingface_hub's own errors are by type, each with its remedy."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError)

    if os.path.isfile(os.path.join(name, "config.json")):
        weights = [f for f in os.listdir(name) if f.endswith((".safetensors", ".bin", ".safetensors.index.json"))]
        if not weights:  # transformers writes config.json first: a save that stopped part-way
            raise MissingInput(f"model {name}: config.json but no weights (model.safetensors or its shards): a save "
                               "that did not finish; train or copy it again")
        return
    if os.path.isdir(name):
        raise MissingInput(f"model {name}: the directory has no config.json (a LoRA adapter directory goes in "
                           "adapter= or init_adapter=, with its base model in model=)")
    local = f"model {name}: no such local directory, and"
    try:
        hf_hub_download(name, "config.json")
    except HFValidationError:
        raise MissingInput(f"{local} not a hub id (org/name) either") from None
    except GatedRepoError:  # before RepositoryNotFoundError: it is one
        raise MissingInput(f"model {name} is gated on the Hugging Face hub: accept its terms at {constants.ENDPOINT}/"
                           f"{name}, then log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise MissingInput(f"{local} no such model on the Hugging Face hub: check the spelling (a private model "
                           "needs `hf auth login`)") from None
    except RemoteEntryNotFoundError:
        raise MissingInput(f"model {name}: the hub repository has no config.json: not a transformers model") from None
    except LocalEntryNotFoundError:
        why = ("all that HF_HUB_OFFLINE=1 allows" if constants.HF_HUB_OFFLINE
               else f"and {constants.ENDPOINT} cannot be reached")
        raise MissingInput(f"{local} not in the hub cache ({constants.HF_HUB_CACHE}), {why}: download it once with "
                           f"network (`hf download {name}`), or set model= to a local directory") from None
    except HfHubHTTPError as e:  # e.g. 401 for a token the hub refuses
        raise MissingInput(f"model {name}: the hub answered HTTP {e.response.status_code}: check your token "
                           "(`hf auth login`)") from None


def estimate_params(path: str) -> float:
    """Rough parameter count of a Qwen2.5-VL config (text layers, embeddings, vision tower), without
    loading any weights: enough to tell a 7B from a test model."""
    config = AutoConfig.from_pretrained(path)
    text, vision = config.get_text_config(), config.vision_config
    h, layers, mlp = text.hidden_size, text.num_hidden_layers, text.intermediate_size
    per_layer = 4 * h * h + 3 * h * mlp  # attention (upper bound with GQA) + gated MLP
    v_per_layer = 4 * vision.hidden_size ** 2 + 3 * vision.hidden_size * vision.intermediate_size
    return layers * per_layer + 2 * text.vocab_size * h + vision.depth * v_per_layer


def pick_device(name: str = "auto", model_path: str | None = None) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():  # under torchrun / accelerate launch, this process's own GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if model_path is not None and estimate_params(model_path) > CPU_AUTO_MAX_PARAMS:
        raise SystemExit(f"{model_path}: ~{estimate_params(model_path) / 1e9:.0f}B parameters and no CUDA GPU is "
                         "visible to torch (torch.cuda.is_available() is False; check the driver, CUDA_VISIBLE_DEVICES "
                         "and that torch is a CUDA build: docs/gpu.md). To run it on the CPU anyway: device=cpu")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        # fp16 without loss scaling underflows LoRA gradients; fp32 is slow but right. dtype=fp16 to choose it
        print(f"{torch.cuda.get_device_name(device)} has no bf16: computing in fp32 (dtype=fp16 is faster, unscaled)")
        return torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": torch.float32, "float32": torch.float32}[name]


def quantization_config(kind: str, compute_dtype: torch.dtype):
    # The vision tower and lm_head stay in full precision: quantising them saves little, costs accuracy,
    # and bitsandbytes' CPU kernels crash on layers with fewer than 64 input features (the tiny vision MLP).
    skip = ["model.visual", "lm_head"]  # matched from the start of the module path
    if kind == "none":
        return None
    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"quantization must be none, 4bit or 8bit, got '{kind}'")


def load_model(cfg, adapter: str | None = None, trainable: bool = True, lora: bool = True,
               train_vision: bool = False):
    """cfg: a config with ModelConfig's keys. Returns (model, processor).
    lora=True: a PeftModel whose adapter 'default' is loaded from `adapter` (or new), trainable if
    `trainable`. lora=False: the plain model with every language-model weight trainable (full
    fine-tuning). The vision tower stays frozen unless `train_vision` (with LoRA: a trained copy of it
    that the adapter carries, see VISION_TOWER). A model computing in 16 bits keeps its trainable
    weights in fp32 (see keep_fp32_master_weights)."""
    path = resolve_model_path(cfg.model, cfg.seed if cfg.model in TINY_SIZES else 0)
    check_model(path)
    device = pick_device(cfg.device, path)
    dtype = pick_dtype(cfg.dtype, device)
    if device.type == "cuda":
        # TF32 matmuls for whatever stays in fp32 (LoRA weights, log-softmax): ~8x the fp32 rate on
        # Ampere and later, with a 10-bit mantissa that training does not notice
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.backend == "unsloth":
        from pathvlm.unsloth_backend import load_unsloth_model  # optional, GPU only: imported only when asked
        return load_unsloth_model(cfg, path, adapter, trainable), load_processor(path, cfg.min_pixels, cfg.max_pixels)
    if cfg.attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise SystemExit("attn_implementation=flash_attention_2 needs `pip install flash-attn` (GPU only); "
                             "use attn_implementation=sdpa")
    quant = quantization_config(cfg.quantization, dtype)
    if quant is not None and device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, quantization_config=quant, attn_implementation=cfg.attn_implementation,
        device_map={"": device} if quant is not None else None)
    if quant is None:
        model.to(device)
    if cfg.quantization == "4bit":
        keep_one_4bit_layout(model)
    # The checkpoint's generation_config.json (Qwen2.5-VL-7B-Instruct's: top_k 1, top_p 0.001,
    # temperature 0.1, repetition_penalty 1.05) would fill in every generation setting we do not
    # pass, so GRPO would sample from something other than the policy it scores. We pass complete
    # configs (generation_config below) and leave the model a neutral default besides.
    model.generation_config = GenerationConfig()
    processor = load_processor(path, cfg.min_pixels, cfg.max_pixels)
    model.requires_grad_(False)  # the vision tower (and the rest of the base) stays frozen
    if cfg.gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.compute_dtype = dtype  # what autocast() computes in, whatever the trainable weights are kept in
    if lora:
        model = attach_lora(model, cfg, adapter, trainable, train_vision and trainable)
    elif trainable:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        if train_vision:
            model.model.visual.requires_grad_(True)
    if trainable:
        keep_fp32_master_weights(model)
    return model, processor


def keep_fp32_master_weights(model):
    """Trainable 16-bit weights become fp32; the forward pass still computes in 16 bits (autocast() casts
    them per op). Updated in place in bf16, a weight keeps 8 significant bits: at lr 2e-5 Adam moves it
    by ~2e-5, below half a bf16 ulp (3e-5 at 0.008, 6e-5 at 0.02) for any weight above ~0.008, so most
    updates round to zero and bf16 full fine-tuning barely trains (tests/test_sft.py). fp32 weights are
    the usual mixed-precision "master weights" (Micikevicius et al., 2018). Their cost: the trainable
    weights and their gradients take 4 + 4 bytes a parameter instead of 2 + 2. For finetune=full on the
    7B (7.6B trainable) that is ~61 GB for weights and gradients instead of ~30 GB, ~76 GB with the 8-bit
    Adam states (configs/sft_full.yaml). LoRA adapters are fp32 already (PEFT's default), so QLoRA costs
    nothing more; the tower copy that train_vision trains under LoRA is 0.67B x 8 bytes. Frozen weights
    stay 16-bit."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()


def keep_one_4bit_layout(model):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bf16 inference kernel the first
    time its layer runs in eval mode without grad, and never packs it back: a training pass after any
    sampling or reference pass then takes a branch without autograd and fails ("a view of a leaf Variable
    that requires grad is being used in an in-place operation"). That kernel also computes in bf16, so the
    sampler and the loss would see two different policies. We turn the repacking off for every layer:
    one weight layout, one arithmetic, on every CPU."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # set by bitsandbytes from the CPU's flags


def attach_lora(model, cfg, adapter: str | None, trainable: bool, train_vision: bool = False):
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.gradient_checkpointing and trainable:
        # with checkpointing, the frozen embeddings must hand a grad-requiring tensor to the first
        # block, or no gradient reaches the adapters
        model.enable_input_require_grads()
    if adapter is not None:
        check_adapter_dir(adapter)
        check_adapter_fits(model, adapter)
        with reading(adapter, "the adapter", "train or copy it again"):
            model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
        # an adapter brings the dropout it was trained with; this run's config decides (GRPO's is 0)
        set_lora_dropout(model, cfg.lora_dropout)
        config = model.peft_config["default"]
        if train_vision and VISION_TOWER not in (config.modules_to_save or []):  # an adapter trained without it
            from peft.utils.other import set_additional_trainable_modules

            config.modules_to_save = [*(config.modules_to_save or []), VISION_TOWER]
            set_additional_trainable_modules(model, config, model_config=None, adapter_name="default")
        elif not train_vision:  # an adapter's trained tower is used, and stays frozen (GRPO, eval)
            freeze_vision_copy(model)
        return model
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=LORA_TARGET, modules_to_save=[VISION_TOWER] if train_vision else None,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def freeze_vision_copy(model):
    """An adapter's trained vision tower (PEFT modules_to_save) is used, not trained. PEFT's set_adapter makes
    it trainable again, so GRPO calls this after each switch back to its policy adapter."""
    for name, p in model.named_parameters():
        if ".modules_to_save." in name and ".visual." in name:
            p.requires_grad_(False)


def set_lora_dropout(model, p: float):
    """Every LoRA layer's dropout, for every adapter, becomes p (identity when 0)."""
    for module in model.modules():
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            for name in module.lora_dropout:
                module.lora_dropout[name] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()


def check_adapter_dir(path: str):
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(f"adapter directory not found or has no adapter_config.json: {path} "
                                "(give the output_dir of a finished train_sft.py / train_grpo.py run)")


def check_adapter_fits(model, adapter: str):
    """Every weight of the adapter against the module it goes on, from the safetensors header alone (before
    PEFT loads it): an adapter trained on another model size stops here with one message naming both, not
    with torch's `size mismatch for ...lora_B` after the load. A file cut short fails its header here too."""
    from safetensors import safe_open

    path = os.path.join(adapter, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return  # an older .bin adapter: PEFT's own load checks it
    with reading(path, "the adapter's weights", "train or copy the adapter again"), safe_open(path, "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    base, params = model.get_base_model() if hasattr(model, "get_base_model") else model, None
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_A." in name or ".lora_B." in name:  # A: (r, in_features), B: (out_features, r)
            try:
                module = base.get_submodule(name.split(".lora_")[0])
                want = [shape[0], module.in_features] if ".lora_A." in name else [module.out_features, shape[1]]
            except AttributeError:
                want = None
        else:  # a whole module's copy (PEFT modules_to_save, the trained vision tower)
            params = params or {n: list(p.shape) for n, p in base.named_parameters()}
            want = params.get(name)
        if want != list(shape):
            found = "no such module" if want is None else f"the model's {want}"
            raise BadInput(f"adapter {adapter} does not fit model {model.config._name_or_path}: {key} is "
                           f"{list(shape)}, {found}; it was trained on another base model: give that one in model=")


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# The model underneath: its compute dtype, autocast, and the base model under a PeftModel

def compute_dtype(model) -> torch.dtype:
    """The dtype load_model loaded the model in: not that of fp32 master weights (keep_fp32_master_weights)."""
    base = unwrap(model)
    return getattr(base, "compute_dtype", base.dtype)  # unsloth_backend's models do not set it


def autocast(model):
    """bf16/fp16 autocast when the model computes in 16 bits (GPU): the LoRA weights are fp32 (PEFT keeps
    trainable adapters in fp32), and without autocast each LoRA layer casts its 16-bit input to an
    fp32 copy and multiplies in fp32. The same holds for fp32 master weights (keep_fp32_master_weights).
    Nothing changes for an fp32 model (the CPU default).
    cache_enabled=False: autocast's cache would keep the 16-bit cast of every fp32 weight that requires grad
    until the forward pass ends, a second copy of all trainable weights (15 GB for the 7B under
    finetune=full, on top of the previous micro-batch's gradients); uncached, each cast is freed with its layer."""
    dtype = compute_dtype(model)
    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype, cache_enabled=False)


def unwrap(model):
    """The Qwen2_5_VLForConditionalGeneration under a PeftModel (LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
