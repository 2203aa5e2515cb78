"""Read a trained model out of a run: `load_model(CHECKPOINT_OR_RUN_DIR)` for notebooks and evaluation.

A checkpoint directory (`<run.dir>/checkpoints/step_NNNNNNNN`, see moe_train.parallel.dist_checkpoint)
holds canonical tensors and the run's config; a run directory means its newest checkpoint. Whatever
layout or engine trained it, the model comes back as one single-device MoETransformer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moe_train.config import Config, from_dict
from moe_train.model import MoETransformer, build_model
from moe_train.parallel.dist_checkpoint import is_distributed_checkpoint, load_canonical_tensors
from moe_train.train.checkpoint import CheckpointError, checkpoint_root, list_checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or the newest checkpoint of a run directory."""
    p = Path(path)
    if is_distributed_checkpoint(p):
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1]
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    raise CheckpointError(
        f"{p} is neither a checkpoint (no index.json) nor a run directory ({checkpoint_root(p)} is empty)"
    )


def checkpoint_config(checkpoint: Path) -> Config:
    """The run config saved with a checkpoint (its engine section dropped: loading needs no engine)."""
    path = checkpoint / "config.json"
    try:
        values: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from None
    values.pop("engine", None)
    return from_dict(values)


@torch.no_grad()
def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path | str) -> None:
    """Copy canonical tensors into a single-device model; every parameter and persistent buffer (e.g. the
    expert bias of moe.bias_update_rate) must be there, shapes equal."""
    persistent = set(model.state_dict())
    params = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if n in persistent}
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{source} does not match the model: {what}")
    for name, param in params.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise CheckpointError(
                f"{source}: {name} has shape {list(tensors[name].shape)}, the model {list(param.shape)}"
            )
        param.copy_(tensors[name])


def load_model(path: str | Path, device: str | torch.device = "cpu") -> MoETransformer:
    """The model of a checkpoint or run directory, in eval mode: `model(tokens_BS).logits_BSV`."""
    checkpoint = resolve_checkpoint(path)
    cfg = checkpoint_config(checkpoint)
    model = build_model(cfg, initialise=False)  # load_weights fills every tensor (or refuses)
    load_weights(model, load_canonical_tensors(checkpoint), checkpoint)
    return model.to(device).eval()
