"""What a config may hold: the YAML a config file may contain, and the values each key may take.

config.py declares the keys and their defaults; this module holds the tables that say which values each
key accepts (CHOICES, RANGES) and the strict YAML reader. Both are checked as a key is read, so the message
names the file or the command line. No project imports: every layer above may use it.
"""

import difflib
import math
import os
import re

import yaml


class ConfigError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# What each key may hold: checked as the key is read (the message names the file or the command line), so
# a bad value stops the run before anything loads, not at step 1. A new key with a set of values or a range
# gets one line here; tests/test_config.py fails for a numeric or enumerated key that has none.

# eval.py's image-reliance controls (evaluation.control_sets builds each)
IMAGE_CONTROLS = ("blank", "shuffled")

# key -> its allowed values (for a dict its names, for a list its items). "cuda:N": cuda:0, cuda:1, ...
CHOICES = {
    "device": ("auto", "cpu", "cuda", "cuda:N"),
    "dtype": ("auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"),
    "quantization": ("none", "4bit", "8bit"),
    "attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "backend": ("hf", "unsloth"),
    "judge": ("none", "api", "self", "rule"),
    "optimizer": ("adamw", "adamw_8bit", "paged_adamw_8bit"),
    "lr_schedule": ("cosine", "constant"),
    "finetune": ("lora", "full"),
    "reference": ("sft", "base", "none"),
    "loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
    "scale_rewards": ("group", "batch", "none"),
    "merge_for_sampling": (True, False, "auto"),
    "sampler": ("static", "hf"),
    "cuda_graph": (True, False, "auto"),
    "open_answer_reward": ("exact", "f1", "judged"),
    "image_controls": IMAGE_CONTROLS,
    # "rewards": the names of rewards.REWARDS, which lives above this layer: the scripts that read the key pass
    # them in (load_config's `names`), so a reward added there is known here without an import upward
}

# key -> the interval its number must lie in: [ ] includes the bound, ( ) excludes it. A float must also be
# finite (nan and inf are refused) unless its interval ends in "inf]".
RANGES = {
    # ModelConfig
    "seed": "[0, 2147483647]", "min_pixels": "[1, inf)", "max_pixels": "[1, inf)", "lora_r": "[1, inf)",
    "lora_alpha": "[1, inf)", "lora_dropout": "[0, 1)", "collective_timeout": "(0, inf)",
    # JudgeConfig
    "judge_concurrency": "[1, inf)", "judge_timeout": "(0, inf)", "judge_max_retries": "[0, inf)",
    "judge_deadline": "(0, inf)", "judge_max_failure_share": "[0, 1]", "judge_failure_window": "[1, inf)",
    # EvalConfig, TrainConfig, SFTConfig
    "batch_size": "[1, inf)", "max_new_tokens": "[1, inf)", "limit": "[0, inf)", "max_steps": "[1, inf)",
    "lr": "(0, inf)", "weight_decay": "[0, inf)", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)",
    "warmup_steps": "[0, inf)", "grad_clip": "(0, inf]", "save_every": "[0, inf)", "keep_checkpoints": "[0, inf)",
    "eval_items": "[0, inf)", "eval_every": "[0, inf)", "grad_accum": "[1, inf)", "max_len": "[1, inf)",
    # GRPOConfig
    "num_prompts": "[1, inf)", "group_size": "[2, inf)", "max_prompt_len": "[1, inf)", "temperature": "(0, inf)",
    "top_p": "(0, 1]", "max_sampling_rounds": "[1, inf)", "clip_eps": "(0, 1)", "clip_eps_high": "(0, inf)",
    "kl_coef": "[0, inf)", "num_iterations": "[1, inf)", "micro_batch_size": "[1, inf)", "logprob_chunk": "[1, inf)",
    "sample_every": "[0, inf)", "log_groups": "[0, inf)", "max_bad_steps": "[1, inf)",
}

# why a range is what it is, where the bound alone does not say
WHY = {
    "group_size": "advantages compare the completions of one prompt with each other",
    "temperature": "GRPO samples its groups from softmax(logits / T): at T=0 sampling is greedy, a group's "
                   "completions are all alike and the log-probs divide by zero",
    "grad_clip": "the largest gradient norm (inf: no clipping; 0 would zero every update)",
    "max_steps": "fewer would save the untrained starting point as the result",
    "clip_eps": "the ratio is clipped to [1 - ε, 1 + ε]",
    "seed": "numpy takes seeds below 2^32 (each process adds 1000 x its rank)",
}

MAY_BE_EMPTY = {"run_name"}  # "" = its default; every other string key must say something


def _shown(text: str) -> str:
    """A command-line word as a message may quote it: one that may be a pasted secret is not shown, a long one
    is cut (a message quotes a value, never a megabyte of it)."""
    secret = text.startswith(("sk-", "hf_", "ghp_")) or (len(text) >= 32 and re.fullmatch(r"[\w\-.]+", text)
                                                        and not re.search(r"[/=]|\.ya?ml$", text))
    return "<a value that looks like a secret, not shown>" if secret else _cut(text)


def quoted(value) -> str:
    """repr(value) as a message quotes it: at most MAX_QUOTED characters."""
    return _cut(repr(value))


MAX_QUOTED = 120


def _cut(text: str) -> str:
    return text if len(text) <= MAX_QUOTED else f"{text[:MAX_QUOTED]}... ({len(text):,} characters)"


def _looks_like_variable_name(text: str) -> bool:
    """OPENAI_API_KEY, HF_TOKEN, my_key: a name in one case; not sk-..., not 40 random letters and digits."""
    return (re.fullmatch(r"[A-Z_][A-Z0-9_]{0,63}|[a-z_][a-z0-9_]{0,63}", text) is not None
            and ("_" in text or len(text) <= 16))


def _allowed(value, choice) -> bool:
    if isinstance(choice, str) and choice.endswith(":N"):
        return isinstance(value, str) and re.fullmatch(re.escape(choice[:-1]) + r"\d+", value) is not None
    return value == choice and type(value) is type(choice)  # True is not "true", 1 is not True


def _in_range(value, spec: str) -> bool:
    low_bracket, low, high, high_bracket = re.fullmatch(r"([\[(])(.+), (.+)([\])])", spec).groups()
    low, high = float(low), float(high)
    if math.isnan(value):
        return False
    return ((low <= value if low_bracket == "[" else low < value)
            and (value <= high if high_bracket == "]" else value < high))


def _describe(spec: str, value) -> str:
    """"[1, inf)" -> "at least 1" (an int), "(0, inf)" -> "a finite number > 0", "[0, 1]" -> "a number between 0
    and 1"."""
    low_bracket, low, high, high_bracket = re.fullmatch(r"([\[(])(.+), (.+)([\])])", spec).groups()
    if isinstance(value, int) and low_bracket == "[" and high == "inf":
        return f"at least {low}"
    if isinstance(value, int):
        noun = "an int"
    else:
        noun = "a finite number" if high == "inf" and high_bracket == ")" else "a number"
    if low_bracket == "[" and high_bracket == "]" and high != "inf":
        return f"{noun} between {low} and {high}"
    bounds = [f"{'>=' if low_bracket == '[' else '>'} {low}"]
    if high != "inf":
        bounds.append(f"{'<=' if high_bracket == ']' else '<'} {high}")
    return f"{noun} {' and '.join(bounds)}"


def check_value(key: str, value, source: str, names: dict | None = None):
    """One key's value against MAY_BE_EMPTY, CHOICES (and `names`: key -> the names a module above owns) and
    RANGES -> ConfigError naming the key and the source."""
    where = f"{source}: key '{key}'"
    if value is None:  # a `str | None` key left at none
        return
    if isinstance(value, str) and not value.strip() and key not in MAY_BE_EMPTY:
        raise ConfigError(f"{where} is empty: give it a value, or leave it out for its default")
    if key == "judge_api_key_env" and not _looks_like_variable_name(value):  # never echo it: it may be the key
        raise ConfigError(f"{where} must name an environment variable (like OPENAI_API_KEY), not hold the key "
                          "itself: export the key as that variable and give its name (the value given is not shown)")
    choices = CHOICES.get(key) or (names or {}).get(key)
    if choices is not None:
        choices = tuple(choices)
        shown = ", ".join(str(c).lower() if isinstance(c, bool) else c for c in choices)
        for item in value if isinstance(value, (list, dict)) else [value]:
            if not any(_allowed(item, c) for c in choices):
                close = difflib.get_close_matches(str(item), [str(c) for c in choices], n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                if isinstance(value, (list, dict)):
                    noun = {"rewards": "reward", "image_controls": "control"}.get(key, "name")
                    raise ConfigError(f"{where}: unknown {noun} {quoted(item)}; allowed: {shown}{hint}")
                raise ConfigError(f"{where} must be one of {shown}; got {quoted(item)}{hint}")
    numbers = value.items() if isinstance(value, dict) else [(None, value)]
    for name, number in numbers:
        if isinstance(number, float) and not math.isfinite(number) and not (name is None and key in RANGES):
            shown_key = f"{key}.{name}" if name else key
            raise ConfigError(f"{source}: key '{shown_key}' must be a finite number, got {quoted(number)}")
    if key in RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not _in_range(value, RANGES[key]):
            why = f": {WHY[key]}" if key in WHY else ""
            raise ConfigError(f"{where} must be {_describe(RANGES[key], value)}, got {quoted(value)}{why}")


# ----------------------------------------------------------------------------------------------
# YAML: PyYAML's safe loader (plain values only, never Python objects), refusing a key written twice in one
# mapping, which PyYAML would otherwise resolve silently by keeping the last

class _StrictLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader, node, deep=False):
    first_line = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` is meant to be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (first on line {first_line[key] + 1}) and YAML would keep "
                    "only the last: delete one", key_node.start_mark)
            first_line[key] = key_node.start_mark.line
        except TypeError:  # an unhashable key: construct_mapping says so
            pass
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# A config is a few kilobytes of a few hundred values. Past these, parsing would take minutes or all memory: PyYAML
# reads a 100 MB mapping for many minutes, and nine levels of ten aliases (&a, *a) expand to 10^9 values.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000


def _expanded_size(node, sizes: dict) -> int:
    """How many values the YAML node becomes once every alias is expanded, counted on the node graph (an alias is
    the same node object again), each node once: linear in the text, whatever the expansion."""
    if id(node) not in sizes:
        children = node.value if isinstance(node.value, list) else []
        flat = [c for child in children for c in (child if isinstance(child, tuple) else (child,))]
        sizes[id(node)] = 1 + sum(_expanded_size(c, sizes) for c in flat)
    return sizes[id(node)]


def _parse_yaml(text: str, where: str, with_line: bool = True):
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text):,} characters, more than a config holds (at most {MAX_YAML_BYTES:,}): "
                          "is it the right file?")
    try:
        node = yaml.compose(text, Loader=_StrictLoader)
        if node is not None and _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: its aliases (&name, *name) expand to more than {MAX_YAML_VALUES:,} values, "
                              "more than a config holds: write the values out")
        return yaml.load(text, Loader=_StrictLoader)
    except RecursionError:  # nesting thousands of levels deep
        raise ConfigError(f"{where}: nested thousands of levels deep: not a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if with_line and mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        tag = re.search(r"constructor for the tag '(.+?)'", problem)
        if tag:
            problem = (f"the tag {tag.group(1).replace('tag:yaml.org,2002:', '!!')} is not read: a config holds plain "
                       "values (numbers, strings, lists, mappings), never Python objects")
        elif not isinstance(e, yaml.constructor.ConstructorError):
            problem = f"not valid YAML: {problem}"
        raise ConfigError(f"{where}{line}: {problem}") from None


def _read_yaml_file(path: str):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {_shown(path)}" + (" (a directory)" if os.path.isdir(path) else ""))
    try:
        if os.path.getsize(path) > MAX_YAML_BYTES:  # before reading a file of any size into memory
            raise ConfigError(f"{path}: {os.path.getsize(path):,} bytes, more than a config holds (at most "
                              f"{MAX_YAML_BYTES:,}): is it the right file?")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte {raw[e.start]:#x}): save the file as "
                          "UTF-8") from None
    return _parse_yaml(text, path)
