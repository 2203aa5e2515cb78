"""`engine.deepspeed_config`: load a ds_config (a path or an inline mapping) and check it against the run.

The DeepSpeed engine (moe_train/train/deepspeed_engine.py) runs ZeRO stage 1 or 2 on data x expert
parallel layouts with moe_train's own AdamW (optim.*), learning-rate schedule and precision. A ds_config
chooses what only DeepSpeed knows: the ZeRO stage, optimizer CPU offload, bucket sizes, overlap. Keys the
run config already decides are filled in from it (a value of "auto" is filled in too); a value that
contradicts the run config is a ConfigError naming both. Everything here is checked when the config is
loaded, except the one value that needs the world size (gradient_accumulation_steps), which
`deepspeed_config_for(cfg, dp_size)` checks before any process group exists.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from moe_train.config import Config, ConfigError

KEY = "engine.deepspeed_config"
REFUSED_SECTIONS = {
    "optimizer": "moe_train builds AdamW from optim.*",
    "scheduler": "moe_train sets the learning rate from optim.schedule",
    "fp16": "use train.precision (bf16 autocast with fp32 master weights)",
    "bf16": "use train.precision (bf16 autocast with fp32 master weights)",
}


def load_deepspeed_config(value: str | dict[str, Any] | None) -> dict[str, Any]:
    """The ds_config mapping: a deep copy of an inline mapping, or the parsed .json / .yaml file."""
    if value is None:
        raise ConfigError(f"{KEY} must be set with engine.name=deepspeed (a ds_config path or mapping)")
    if isinstance(value, dict):
        return copy.deepcopy(value)
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{KEY} ({value}) is not a file")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{KEY} ({value}) cannot be parsed: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{KEY} ({value}) must hold a mapping at the top level")
    return data


def _fill(ds: dict[str, Any], key: str, want: Any, source: str) -> None:
    """Set ds[key] to `want`; a different value already there (other than "auto") is an error."""
    have = ds.get(key, "auto")
    if have != "auto" and have != want:
        raise ConfigError(f"{KEY} {key} ({have}) contradicts {source} ({want})")
    ds[key] = want


def _check_layout(cfg: Config) -> None:
    p = cfg.parallel
    for key in ("tp", "pp", "vpp", "etp"):
        value = getattr(p, key)
        if value != 1:
            raise ConfigError(
                f"parallel.{key} ({value}) must be 1 with engine.name=deepspeed (data x expert parallel only)"
            )
    if p.zero1:
        raise ConfigError(
            "parallel.zero1 cannot be combined with engine.name=deepspeed; set zero_optimization.stage in " + KEY
        )


def _check_zero(cfg: Config, ds: dict[str, Any]) -> None:
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{KEY} zero_optimization ({zero!r}) must be a mapping")
    stage = zero.get("stage", 0)
    if stage == 3:
        raise ConfigError(
            f"{KEY} zero_optimization.stage (3) is not supported: DeepSpeed refuses ZeRO-3 with MoE; use 1 or 2"
        )
    if stage not in (1, 2):
        raise ConfigError(
            f"{KEY} zero_optimization.stage ({stage}) must be 1 or 2 (for plain data parallel use engine.name=native)"
        )
    if "offload_param" in zero:
        raise ConfigError(f"{KEY} zero_optimization.offload_param needs ZeRO-3; only offload_optimizer is supported")
    if stage == 2 and cfg.parallel.ep > 1:
        for key in ("contiguous_gradients", "reduce_scatter"):
            if zero.get(key, True) is not True:
                raise ConfigError(
                    f"{KEY} zero_optimization.{key} must be true with stage 2 and parallel.ep > 1 (DeepSpeed MoE)"
                )


def check_deepspeed_config(cfg: Config) -> dict[str, Any]:
    """Validate engine.name=deepspeed against the run config; returns the ds_config with the batch sizes
    and clipping filled in (gradient_accumulation_steps still unset when the ds_config leaves it out)."""
    _check_layout(cfg)
    ds = load_deepspeed_config(cfg.engine.deepspeed_config)
    for section, why in REFUSED_SECTIONS.items():
        enabled = ds.get(section)
        if enabled is not None and not (isinstance(enabled, dict) and enabled.get("enabled") is False):
            raise ConfigError(f"{KEY} section '{section}' is not supported: {why}")
    t = cfg.train
    _fill(ds, "train_batch_size", t.global_batch_size, "train.global_batch_size")
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size")
    _fill(ds, "gradient_clipping", cfg.optim.grad_clip, "optim.grad_clip")
    gas = ds.get("gradient_accumulation_steps", "auto")
    if gas != "auto" and (not isinstance(gas, int) or gas < 1 or t.global_batch_size % (gas * t.micro_batch_size)):
        raise ConfigError(
            f"{KEY} gradient_accumulation_steps ({gas}) does not divide train.global_batch_size "
            f"({t.global_batch_size}) into micro-batches of train.micro_batch_size ({t.micro_batch_size})"
        )
    _check_zero(cfg, ds)
    return ds


def deepspeed_config_for(cfg: Config, dp_size: int) -> dict[str, Any]:
    """The ds_config for `dp_size` data-parallel ranks: gradient_accumulation_steps is the number of
    micro-batches per step (train.global_batch_size / (dp_size * train.micro_batch_size))."""
    ds = check_deepspeed_config(cfg)
    micro_batches = cfg.train.global_batch_size // (dp_size * cfg.train.micro_batch_size)
    source = f"train.global_batch_size / (data-parallel size {dp_size} * train.micro_batch_size)"
    _fill(ds, "gradient_accumulation_steps", micro_batches, source)
    ds.setdefault("steps_per_print", 2**31 - 1)  # moe_train logs progress itself
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch AdamW (exactly the native update)
    ds.setdefault("zero_force_ds_cpu_optimizer", False)  # offload keeps torch AdamW, on the CPU
    return ds
