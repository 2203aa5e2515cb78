"""Trainer hooks of the data mixture: losses to the policy, policy evaluations, data state in checkpoints.

The policy must compute the identical update on every rank, so the per-domain LM-loss sums and counts
of a step are all-gathered over the `mixture` group (only ranks with `contributes_domain_loss`, one per
data-parallel replica, send non-zero values) and summed in rank order in float64: every rank adds the
same numbers in the same order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from moe_train.config import Config
from moe_train.data.errors import DataError
from moe_train.parallel.groups import ProcessGroups
from moe_train.train.step import StepTotals

if TYPE_CHECKING:
    from moe_train.train.trainer import Trainer

DATA_STATE = "data_state"


def needs_validation(cfg: Config) -> bool:
    """Whether the mixture policy asks for validation losses (Aioli)."""
    return cfg.data.mixture.policy == "aioli"


def gather_domain_losses(totals: StepTotals, groups: ProcessGroups) -> torch.Tensor:
    """[loss sums | sequence counts] per domain over all replicas, on the device and bitwise equal on every
    rank (summed in rank order); no host sync."""
    local = torch.cat([totals.domain_sum, totals.domain_count]).double() * float(groups.contributes_domain_loss)
    if groups.size("mixture") == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(groups.size("mixture"))]
    dist.all_gather(parts, local, group=groups.mixture)
    total = torch.zeros_like(local)
    for part in parts:  # rank order: the same additions on every rank
        total += part
    return total


def observe_step(trainer: Trainer, step: int, domain_losses: torch.Tensor) -> None:
    """Hand the step's per-domain losses (`gather_domain_losses`, copied to the host) to an online policy."""
    values = domain_losses.numpy()
    num = values.size // 2
    trainer.data.observe(step, values[:num].copy(), values[num:].copy())


def maybe_evaluate(trainer: Trainer) -> None:
    """Run validation for the policy when it asks (Aioli's LearnParams), after trainer.state.step steps."""
    policy, completed = trainer.data.policy, trainer.state.step
    if completed >= trainer.cfg.train.max_steps or not policy.eval_due(completed):
        return
    losses = trainer.evaluate()
    policy.observe_eval(completed, np.asarray([losses[d] for d in trainer.data.domains], dtype=np.float64))


def load_data_state(checkpoint: Path) -> dict[str, Any] | None:
    """The data state saved with a checkpoint (None for a checkpoint written without one)."""
    return load_json_state(checkpoint, DATA_STATE)


def load_json_state(checkpoint: Path, name: str) -> dict[str, Any] | None:
    """`<checkpoint>/<name>.json` written by save(extra_json=...), or None when the checkpoint has none."""
    path = Path(checkpoint) / f"{name}.json"
    if not path.is_file():
        return None
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{name.replace('_', ' ')} {path} cannot be read ({exc.__class__.__name__})") from None
    return state
