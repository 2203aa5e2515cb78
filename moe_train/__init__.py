"""moe_train: pretraining Mixture-of-Experts language models.

`moe_train.load_model(CHECKPOINT_OR_RUN_DIR)` returns a trained model in eval mode (see
moe_train.interop.checkpoint_io); everything else lives in the subpackages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moe_train.model import MoETransformer

__all__ = ["load_model"]


def load_model(path: Any, device: Any = "cpu") -> MoETransformer:
    """The model of a checkpoint or run directory, in eval mode: `model(tokens_BS).logits_BSV`."""
    from moe_train.interop.checkpoint_io import load_model as _load_model

    return _load_model(path, device)
