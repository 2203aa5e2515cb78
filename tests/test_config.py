"""Config loading, dotted overrides, strict validation, and the README reference staying in sync."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moe_train.config import Config, ConfigError, config_reference, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_valid_and_overrides_apply() -> None:
    cfg = load_config(None, ["optim.lr=3e-4", "moe.num_experts=16", "train.max_steps=50", "moe.capacity_factor=1.25"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.moe.num_experts == 16
    assert cfg.train.max_steps == 50
    assert cfg.moe.capacity_factor == 1.25
    assert load_config(None, ["moe.capacity_factor=null"]).moe.capacity_factor is None
    assert load_config(None, ["moe.lbl.coeff=0"]).moe.lbl.coeff == 0.0


def test_yaml_file_and_override_precedence(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 128\noptim:\n  lr: 0.01\n")
    cfg = load_config(path, ["optim.lr=0.02"])
    assert cfg.model.hidden_size == 128
    assert cfg.optim.lr == 0.02


def test_every_shipped_config_loads() -> None:
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        assert isinstance(load_config(path), Config), path


BAD_CONFIGS = [
    (["model.hiden_size=3"], "unknown config key 'model.hiden_size'"),
    (["modle.hidden_size=3"], "unknown config key 'modle'"),
    (["model.hidden_size=abc"], "model.hidden_size ('abc') must be an integer"),
    (["model.hidden_size=1.5"], "model.hidden_size (1.5) must be an integer"),
    (["model.hidden_size=0"], "model.hidden_size (0) must be > 0"),
    (["model.num_heads=6", "model.num_kv_heads=4"], "model.num_heads (6) is not divisible by model.num_kv_heads (4)"),
    (["model.head_dim=33"], "model.head_dim (33) must be even"),
    (["moe.top_k=9"], "moe.top_k (9) must be <= moe.num_experts (8)"),
    (["moe.score_func=relu"], "moe.score_func ('relu') must be one of softmax, sigmoid"),
    (["moe.capacity_factor=-1"], "moe.capacity_factor (-1.0) must be > 0"),
    (["moe.lbl.coeff=-0.1"], "moe.lbl.coeff (-0.1) must be >= 0"),
    (["moe.lbl.scope=batch"], "moe.lbl.scope ('batch') must be one of"),
    (["moe.lbl.global_mode=approx"], "moe.lbl.global_mode ('approx') must be one of"),
    (["moe.bias_update_rate=-1"], "moe.bias_update_rate (-1.0) must be >= 0"),
    (["moe.first_k_dense=9"], "moe.first_k_dense (9) must be in [0, model.num_layers (4)]"),
    (["moe.drop_policy=random"], "moe.drop_policy ('random') must be one of probs, position"),
    (["train.max_steps=0"], "train.max_steps (0) must be > 0"),
    (["train.precision=fp16"], "train.precision ('fp16') must be one of fp32, bf16"),
    (["optim.lr=-1"], "optim.lr (-1.0) must be > 0"),
    (["optim.beta2=1.0"], "optim.beta2 (1.0) must be in [0, 1)"),
    (["optim.schedule=linear"], "optim.schedule ('linear') must be one of cosine, wsd, constant"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last (0) must be >= 1"),
    (["parallel.ep=3"], "moe.num_experts (8) is not divisible by parallel.ep (3)"),
    (["data.mock=maybe"], "data.mock ('maybe') must be true or false"),
    (["data.domains=[]"], "data.domains must not be an empty list"),
    (["data.domain_weights=[1.0]"], "data.domain_weights ([1.0]) needs data.domains of the same length"),
    (["log.level=LOUD"], "log.level ('LOUD') must be one of"),
    (["train.seed"], "override 'train.seed' must look like key.path=value"),
    (["train=3"], "train (3) must be a mapping of TrainConfig fields"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_CONFIGS)
def test_bad_config_rejected_with_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(listy)


def test_round_trip_through_dict() -> None:
    from moe_train.config import from_dict

    cfg = load_config(None, ["moe.num_shared_experts=1", "data.domains=[code, prose]"])
    assert from_dict(to_dict(cfg)) == cfg


def test_readme_config_reference_in_sync() -> None:
    """README.md holds the generated reference table verbatim between markers."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- config-reference:start -->\n(.*?)\n<!-- config-reference:end -->", readme, re.S)
    assert match, "README.md lacks the config reference markers"
    assert match.group(1).strip() == config_reference().strip(), (
        "README config reference is stale: regenerate with python -m moe_train.config"
    )


def test_every_field_documented() -> None:
    table = config_reference()
    rows = [line for line in table.splitlines()[2:]]
    assert len(rows) > 60
    for row in rows:
        assert not row.rstrip().endswith("|  |"), f"undocumented field: {row}"
