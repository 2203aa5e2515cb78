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
from moe_train.train.step import StepStats

if TYPE_CHECKING:
    from moe_train.train.trainer import Trainer

DATA_STATE = "data_state"


def needs_validation(cfg: Config) -> bool:
    """Whether the mixture policy asks for validation losses (Aioli)."""
    return cfg.data.mixture.policy == "aioli"


def gather_domain_losses(
    stats: StepStats, groups: ProcessGroups, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(loss sum, sequence count) per domain over all replicas, bitwise equal on every rank."""
    local = torch.cat([stats.domain_sum, stats.domain_count]).double() * float(groups.contributes_domain_loss)
    if groups.size("mixture") > 1:
        local = local.to(device)
        parts = [torch.empty_like(local) for _ in range(groups.size("mixture"))]
        dist.all_gather(parts, local, group=groups.mixture)
        total = torch.zeros_like(parts[0].cpu())
        for part in parts:  # rank order: the same additions on every rank
            total += part.cpu()
        local = total
    num = stats.domain_sum.numel()
    values = local.cpu().numpy()
    return values[:num].copy(), values[num:].copy()


def observe_step(trainer: Trainer, step: int, stats: StepStats) -> None:
    """Hand the step's per-domain losses to an online policy (a collective: every rank calls it)."""
    if trainer.data.policy.uses_losses:
        loss_sum, count = gather_domain_losses(stats, trainer.groups, trainer.device)
        trainer.data.observe(step, loss_sum, count)


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
