import pytest
import yaml

from config import ConfigError, GRPOConfig, SFTConfig, load_config, parse_args, save_config


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
    with pytest.raises(ConfigError, match="loss_type must be one of grpo, bnpo, dapo, dr_grpo, got 'ppo'"):
        load_config(GRPOConfig, None, ["reference=base", "loss_type=ppo"])


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

    from config import EvalConfig
    scripts = {"sft": SFTConfig, "grpo": GRPOConfig, "eval": EvalConfig}
    paths = glob.glob("configs/*.yaml")
    assert paths
    for path in paths:
        name = path.split("/")[-1]
        cls = next(c for k, c in scripts.items() if k in name)
        load_config(cls, path)


def test_the_papers_rows_are_configs_that_chain():
    """α -> β -> R1, α -> γ, δ and ε from the base: each config loads, and each starts from the output
    of the row the paper builds it on."""
    from config import GRPOConfig, SFTConfig, load_config

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
    for bad, message in [("judge_deadline=0", "judge_deadline must be a positive"),
                         ("judge_max_failure_share=1.5", "judge_max_failure_share must be between 0 and 1"),
                         ("judge_failure_window=0", "judge_failure_window must be at least 1"),
                         ("judge=gpt", "judge must be none, api, self or rule"),
                         ("collective_timeout=-1", "collective_timeout must be a positive")]:
        with pytest.raises(ConfigError, match=message):
            load_config(GRPOConfig, "configs/grpo_process.yaml", [bad])


def test_grpo_refuses_the_unsloth_backend_at_start_up():
    """Unsloth's generate and the shared-prompt sampler cannot work together: one message before any loading."""
    with pytest.raises(ConfigError, match="backend=unsloth is for SFT only"):
        load_config(GRPOConfig, "configs/grpo.yaml", ["backend=unsloth"])
    assert load_config(SFTConfig, "configs/sft.yaml", ["backend=unsloth"]).backend == "unsloth"
