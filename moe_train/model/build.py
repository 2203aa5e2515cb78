"""Build a model from the run configuration."""

from __future__ import annotations

import torch

from moe_train.config import Config
from moe_train.model.transformer import MoETransformer


def build_model(cfg: Config, device: torch.device | str | None = None) -> MoETransformer:
    """Construct and initialise (normal(0, model.init_std)) after torch.manual_seed(train.seed).

    Note: this reseeds the global torch RNG. RoPE tables are sized for train.seq_len and grow lazily.
    """
    torch.manual_seed(cfg.train.seed)
    with torch.device(device or "cpu"):
        return MoETransformer(cfg.model, cfg.moe, max_seq_len=cfg.train.seq_len)
