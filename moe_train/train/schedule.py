"""Learning-rate schedules as pure functions of the step (so resuming needs only the step).

- cosine: linear warmup, then cosine decay to min_lr_ratio * lr at the schedule's end.
- wsd: warmup-stable-decay (MiniCPM, arXiv 2404.06395): warmup, constant, then a linear decay over the
  last optim.decay_fraction of the schedule.
- constant: linear warmup, then constant.

The schedule's length is optim.decay_steps, or train.max_steps when that is null (as Megatron's
lr-decay-iters defaults to train-iters); after its end the LR stays at the floor. A run resumed with a
larger train.max_steps and decay_steps null therefore stretches its schedule: `schedule_change_warning`
says so and how to keep the old one.
"""

from __future__ import annotations

import math
from typing import Any

from moe_train.config import OptimConfig


def schedule_steps(optim: OptimConfig, max_steps: int) -> int:
    """Length of the LR schedule: optim.decay_steps, or train.max_steps when it is null."""
    return optim.decay_steps if optim.decay_steps is not None else max_steps


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    peak, floor = optim.lr, optim.lr * optim.min_lr_ratio
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return peak * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return peak
    end = schedule_steps(optim, max_steps)
    if optim.schedule == "cosine":
        span = max(1, end - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(optim.decay_fraction * end))
    decay_start = max(optim.warmup_steps, end - decay_steps)
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, end - decay_start))
    return peak - (peak - floor) * progress


def schedule_change_warning(saved: dict[str, Any], optim: OptimConfig, max_steps: int, step: int) -> str | None:
    """What to tell a user who resumes at `step` with a config whose schedule differs from the saved one.

    `saved` is the checkpoint's config (nested dict). Only the silent case is reported: train.max_steps
    changed while optim.decay_steps is null in both, so the schedule's length followed max_steps."""
    old_max = saved.get("train", {}).get("max_steps")
    old_decay = saved.get("optim", {}).get("decay_steps")
    if optim.decay_steps is not None or old_decay is not None or old_max in (None, max_steps):
        return None
    if optim.schedule == "constant":
        return None
    before, after = lr_at(step, optim, old_max), lr_at(step, optim, max_steps)
    return (
        f"train.max_steps changed from {old_max} to {max_steps} on resume with optim.decay_steps null: the LR "
        f"schedule now ends at step {max_steps} instead of {old_max} (lr at step {step + 1}: {before:.2e} -> "
        f"{after:.2e}); pass optim.decay_steps={old_max} to keep the old schedule"
    )
