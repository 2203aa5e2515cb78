"""Preemption: SIGTERM / SIGUSR1 (Slurm's `--signal`, a scheduler's notice) → finish the step, save a
checkpoint, exit 0; the requeued job (`checkpoint.resume=auto`) continues bit for bit.

The handler only sets a flag. After every step the ranks all-reduce it (MAX, one int), so all stop after
the same step even when the signal reached only some of them; one tiny collective per step.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from moe_train.parallel.groups import ProcessGroups
from moe_train.utils.logging import get_logger

log = get_logger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Installs the signal handlers for a training loop and tells when every rank should stop."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionHandler:
        if self.enabled:
            for sig in SIGNALS:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread: signals cannot be caught here
                    log.warning("preemption signals are not handled: training does not run in the main thread")
                    break
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def should_stop(self, groups: ProcessGroups, device: torch.device) -> bool:
        """Whether any rank got a signal (a collective when preemption is enabled: every rank calls it)."""
        if not self.enabled:
            return False
        flag = torch.tensor([0 if self.received is None else int(self.received)], dtype=torch.int64, device=device)
        if groups.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) and self.received is None:
            self.received = int(flag)
        return bool(int(flag))

    def signal_name(self) -> str:
        """Name of the signal received (for the log line)."""
        return signal.Signals(self.received).name if self.received else "none"
