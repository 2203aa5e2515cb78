"""Learning-rate schedules as pure functions of the step (so resuming needs only the step).

- cosine: linear warmup, then cosine decay to min_lr_ratio * lr at train.max_steps.
- wsd: warmup-stable-decay (MiniCPM, arXiv 2404.06395): warmup, constant, then a linear decay over the
  last optim.decay_fraction of the run.
- constant: linear warmup, then constant.
"""

from __future__ import annotations

import math

from moe_train.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    peak, floor = optim.lr, optim.lr * optim.min_lr_ratio
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return peak * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return peak
    if optim.schedule == "cosine":
        span = max(1, max_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(optim.decay_fraction * max_steps))
    decay_start = max(optim.warmup_steps, max_steps - decay_steps)
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return peak - (peak - floor) * progress
