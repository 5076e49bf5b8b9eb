import pytest
import yaml

from pathvlm.config import ConfigError, GRPOConfig, SFTConfig, load_config, parse_args, save_config
from rewards import REWARDS


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "lr: 1.0e-5\ngroup_size: 8\nrewards: {format: 1, accuracy: 2}\n")
    cfg = load_config(GRPOConfig, path, ["group_size=4", "lr=3e-6", "kl_coef=0", "reference=base",
                                         "clip_eps_high=0.28", "init_adapter=none"])
    assert cfg.group_size == 4 and cfg.lr == 3e-6 and cfg.kl_coef == 0.0 and isinstance(cfg.kl_coef, float)
    assert cfg.rewards == {"format": 1, "accuracy": 2} and cfg.clip_eps_high == 0.28 and cfg.init_adapter is None


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "grop_size: 4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'grop_size' \(did you mean 'group_size'\?\)"):
        load_config(GRPOConfig, path)
    with pytest.raises(ConfigError, match="command line: unknown config key 'lrr'"):
        load_config(GRPOConfig, None, ["lrr=1"])


def test_wrong_type_names_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'group_size' must be an int"):
        load_config(GRPOConfig, write(tmp_path, "group_size: four\n"))
    with pytest.raises(ConfigError, match="key 'gradient_checkpointing' must be true or false"):
        load_config(SFTConfig, None, ["gradient_checkpointing=maybe"])
    with pytest.raises(ConfigError, match="key 'rewards' must be a dict"):
        load_config(GRPOConfig, None, ["rewards=[1, 2]"])


def test_cross_key_checks():
    with pytest.raises(ConfigError, match="reference=sft needs init_adapter"):
        load_config(GRPOConfig, None, ["reference=sft"])
    with pytest.raises(ConfigError, match="process reward needs a judge"):
        load_config(GRPOConfig, None, ["reference=base", "rewards={process: 1}"])
    with pytest.raises(ConfigError, match="rewards=.*name at least one reward with a weight other than 0"):
        load_config(GRPOConfig, None, ["reference=base", "rewards={format: 0}"])
    with pytest.raises(ConfigError, match="min_pixels=5000 exceeds max_pixels=4000"):
        load_config(SFTConfig, None, ["min_pixels=5000", "max_pixels=4000"])
    with pytest.raises(ConfigError, match="eval_every=0, eval_items=64: SFT computes the held-out loss"):
        load_config(SFTConfig, None, ["eval_every=0"])
    assert load_config(SFTConfig, None, ["eval_every=0", "eval_data=none"]).eval_every == 0


def test_missing_file_and_cli_exit(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTConfig, str(tmp_path / "nope.yaml"))
    with pytest.raises(SystemExit, match="config error"):
        parse_args(SFTConfig, [write(tmp_path, "max_stepz: 3\n")])


def test_resolved_config_saved(tmp_path):
    cfg = load_config(SFTConfig, None, ["max_steps=7"])
    save_config(cfg, str(tmp_path))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["max_steps"] == 7


def test_every_shipped_config_loads():
    import glob

    from pathvlm.config import EvalConfig
    scripts = {"sft": SFTConfig, "grpo": GRPOConfig, "eval": EvalConfig}
    paths = [p for p in glob.glob("configs/*.yaml") if not p.endswith("reproduce.yaml")]  # tools/reproduce.py reads it
    assert paths
    for path in paths:
        name = path.split("/")[-1]
        cls = next(c for k, c in scripts.items() if k in name)
        load_config(cls, path)
    from tools import reproduce
    assert reproduce.read_spec("configs/reproduce.yaml")["sizes"].keys() == {"7b", "3b"}


def test_the_papers_rows_are_configs_that_chain():
    """α -> β -> R1, α -> γ, δ and ε from the base: each config loads, and each starts from the output
    of the row the paper builds it on."""
    from pathvlm.config import GRPOConfig, SFTConfig, load_config

    rows = {"α": (SFTConfig, "sft"), "β": (GRPOConfig, "grpo"), "γ": (SFTConfig, "sft_more"),
            "δ": (SFTConfig, "sft_rl_items"), "ε": (GRPOConfig, "grpo_from_base"), "R1": (GRPOConfig, "grpo_process")}
    cfg = {row: load_config(cls, f"configs/{name}.yaml") for row, (cls, name) in rows.items()}
    for row, (_, name) in rows.items():
        first_line = open(f"configs/{name}.yaml").readline()
        assert f"Row {row}" in first_line or (row == "R1" and "PathVLM-R1" in first_line), name
    assert cfg["β"].init_adapter == cfg["γ"].init_adapter == cfg["α"].output_dir
    assert cfg["R1"].init_adapter == cfg["β"].output_dir
    assert cfg["δ"].init_adapter is None and cfg["ε"].init_adapter is None and cfg["ε"].reference == "base"
    assert cfg["γ"].data == cfg["δ"].data == cfg["β"].data != cfg["α"].data  # the RL items
    assert cfg["β"].group_size == 4 and cfg["β"].max_new_tokens == cfg["β"].max_prompt_len == 1024  # the paper's


def test_judge_keys_are_checked_and_the_collective_timeout_outlasts_the_judge():
    cfg = load_config(GRPOConfig, "configs/grpo_process.yaml")
    assert cfg.collective_timeout > cfg.judge_deadline  # the shipped R1 config is consistent
    with pytest.raises(ConfigError, match="collective_timeout=100 s must exceed the judge's longest wait"):
        load_config(GRPOConfig, "configs/grpo_process.yaml", ["collective_timeout=100"])
    with pytest.raises(ConfigError, match=r"must exceed .* \(360 s"):  # three sampling rounds, three batches
        load_config(GRPOConfig, "configs/grpo_process.yaml", ["dynamic_sampling=true", "collective_timeout=400"])
    for bad, message in [("judge_deadline=0", "'judge_deadline' must be a finite number > 0"),
                         ("judge_max_failure_share=1.5", "'judge_max_failure_share' must be a number between 0 and 1"),
                         ("judge_failure_window=0", "'judge_failure_window' must be at least 1"),
                         ("judge=gpt", "'judge' must be one of none, api, self, rule; got 'gpt'"),
                         ("collective_timeout=-1", "'collective_timeout' must be a finite number > 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config(GRPOConfig, "configs/grpo_process.yaml", [bad])
    judge = GRPOConfig(judge="gpt")  # built in code, not loaded: validate_judge runs the same checks
    with pytest.raises(ConfigError, match="config: key 'judge' must be one of"):
        judge.validate_judge()


def test_grpo_refuses_the_unsloth_backend_at_start_up():
    """Unsloth's generate and the shared-prompt sampler cannot work together: one message before any loading."""
    with pytest.raises(ConfigError, match="backend=unsloth is for SFT only"):
        load_config(GRPOConfig, "configs/grpo.yaml", ["backend=unsloth"])
    assert load_config(SFTConfig, "configs/sft.yaml", ["backend=unsloth"]).backend == "unsloth"


def test_every_numeric_and_enumerated_key_has_its_range_or_choices():
    """The tables are the mechanism: a new numeric key without a RANGES line, or a key whose comment lists its
    values (`a | b`) without a CHOICES line, fails here rather than at step 1 of someone's run."""
    import dataclasses
    import types
    import typing

    from pathvlm.config import CHOICES, RANGES, EvalConfig

    for cls in (SFTConfig, GRPOConfig, EvalConfig):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            optional = typing.get_origin(tp) in (typing.Union, types.UnionType)  # float | None
            numeric = tp in (int, float) or (optional and float in typing.get_args(tp))
            assert not numeric or f.name in RANGES, f"{cls.__name__}.{f.name}: numeric, but no RANGES entry"
    for key in ("device", "dtype", "quantization", "attn_implementation", "backend", "judge", "optimizer",
                "lr_schedule", "finetune", "reference", "loss_type", "scale_rewards", "merge_for_sampling",
                "image_controls"):
        assert key in CHOICES, key
    for cls, path in [(SFTConfig, "configs/sft.yaml"), (GRPOConfig, "configs/grpo.yaml")]:  # defaults and shipped
        for key in RANGES.keys() & {f.name for f in dataclasses.fields(cls)}:
            load_config(cls, path, [f"{key}={getattr(load_config(cls, path), key)}"])


@pytest.mark.parametrize("override, message", [
    ("max_steps=-3", r"command line: key 'max_steps' must be at least 1, got -3"),
    ("num_prompts=0", r"key 'num_prompts' must be at least 1, got 0"),
    ("lr=nan", r"key 'lr' must be a finite number > 0, got nan"),
    ("lr=inf", r"key 'lr' must be a finite number > 0, got inf"),
    ("lr=-1e-4", r"key 'lr' must be a finite number > 0, got -0\.0001"),
    ("temperature=0", r"key 'temperature' must be a finite number > 0, got 0\.0: GRPO samples its groups"),
    ("top_p=1.5", r"key 'top_p' must be a number > 0 and <= 1, got 1\.5"),
    ("adam_beta2=1", r"key 'adam_beta2' must be a number >= 0 and < 1, got 1\.0"),
    ("grad_clip=0", r"key 'grad_clip' must be a number > 0, got 0\.0"),
    ("seed=-1", r"key 'seed' must be an int between 0 and 2147483647, got -1"),
    ("quantization=4-bit", r"key 'quantization' must be one of none, 4bit, 8bit; got '4-bit' "
                           r"\(did you mean '4bit'\?\)"),
    ("device=gpu", r"key 'device' must be one of auto, cpu, cuda, cuda:N; got 'gpu'"),
    ("optimizer=adam", r"key 'optimizer' must be one of adamw, adamw_8bit, paged_adamw_8bit; got 'adam'"),
    ("merge_for_sampling=maybe", r"key 'merge_for_sampling' must be one of true, false, auto; got 'maybe'"),
    ("rewards={acuracy: 1}", r"key 'rewards': unknown reward 'acuracy'; allowed: format, accuracy, process "
                             r"\(did you mean 'accuracy'\?\)"),
    ("rewards={format: one}", r"key 'rewards\.format' must be a number, got 'one'"),
    ("rewards={format: {weight: 1}}", r"key 'rewards\.format' must be a number, got \{'weight': 1\}"),
    ("rewards={format: .nan}", r"key 'rewards\.format' must be a finite number, got nan"),
    ("rewards={format: [}", r"key 'rewards': not valid YAML"),
    ("output_dir=", r"key 'output_dir' is empty"),
])
def test_each_value_is_checked_as_it_is_read(override, message):
    with pytest.raises(ConfigError, match=message):  # the reward names as train_grpo.py passes them
        load_config(GRPOConfig, None, ["reference=base", override], names={"rewards": REWARDS})
    assert load_config(GRPOConfig, None, ["reference=base", "device=cuda:1", "grad_clip=inf"]).grad_clip == float("inf")


def test_a_pasted_key_is_refused_and_never_shown():
    secret = "sk-proj-" + "a1B2c3D4" * 6
    for value in (secret, "0123456789abcdef0123456789abcdef"):
        with pytest.raises(ConfigError) as e:
            load_config(GRPOConfig, None, ["reference=base", f"judge_api_key_env={value}"])
        assert "must name an environment variable (like OPENAI_API_KEY), not hold the key itself" in str(e.value)
        assert value not in str(e.value)
    with pytest.raises(ConfigError) as e:  # the key alone, its `=` forgotten
        load_config(GRPOConfig, None, [secret])
    assert secret not in str(e.value)
    for name in ("OPENAI_API_KEY", "HF_TOKEN", "my_judge_key"):
        assert load_config(GRPOConfig, None, ["reference=base", f"judge_api_key_env={name}"]).judge_api_key_env == name


@pytest.mark.parametrize("text, message", [
    (b"lr: 1.0e-4\nmax_steps: 3\nlr: 2.0e-4\n", r"c\.yaml, line 3: key 'lr' is given twice \(first on line 1\)"),
    (b"rewards: {format: 1, format: 2}\n", r"c\.yaml, line 1: key 'format' is given twice"),
    (b"lr: 1.0e-4\nmax_steps: [3\nseed: 1\n", r"c\.yaml, line 3: not valid YAML: expected ',' or ']'"),
    (b"lr: !!python/object/apply:os.system ['true']\n", r"c\.yaml, line 1: the tag !!python/object/apply:os\.system "
                                                        r"is not read: a config holds plain values"),
    (b"max_steps: 3\noutput_dir: runs/caf\xe9\n", r"c\.yaml, line 2: not UTF-8 text \(byte 0xe9\): save the file "
                                                r"as UTF-8"),
])
def test_a_yaml_file_that_cannot_be_read_as_written_is_one_message(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=message):
        load_config(GRPOConfig, str(path), ["reference=base"])
