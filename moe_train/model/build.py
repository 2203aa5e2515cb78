"""Build a model from the run configuration."""

from __future__ import annotations

import torch

from moe_train.config import Config
from moe_train.model.init import InitSpec, init_specs, materialize_module
from moe_train.model.transformer import MoETransformer


def build_model(cfg: Config, device: torch.device | str | None = None, initialise: bool = True) -> MoETransformer:
    """Construct the single-device model and initialise it with the layout-independent initialiser
    (moe_train.model.init, keyed by train.seed), so it equals every parallel layout's shards bit for bit.

    The model is first built on the meta device (no storage), then each tensor is materialised and
    initialised in turn. With device="meta" it is returned without storage (to be parallelised and
    materialised per shard, moe_train.parallel.materialize). `initialise=False` leaves the parameters
    and persistent buffers uninitialised, for a caller that loads every one of them from a checkpoint
    (load_model, inspect, import). Also seeds the global torch RNG with train.seed. RoPE tables are
    sized for train.seq_len and grow lazily.
    """
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        model = MoETransformer(cfg.model, cfg.moe, max_seq_len=cfg.train.seq_len)
    if torch.device(device or "cpu").type != "meta":
        materialize_module(model, model_init_specs(model), cfg.train.seed, device or "cpu", initialise=initialise)
    return model


def model_init_specs(model: MoETransformer) -> dict[str, InitSpec]:
    """{canonical name: InitSpec} of the (unsharded) model, from its config's init_std and depth."""
    return init_specs(model, model.model_cfg.init_std, model.model_cfg.num_layers)
