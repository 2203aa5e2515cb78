"""Test-only fault injection, driven by the environment variable MOE_TRAIN_FAULTS.

Faults are `;`-separated, each `kind,key=value,...`; `step` is the 0-based step being trained (the
step that becomes metrics step `step + 1`), `rank` the global rank (default: every rank):

    nan_grad,step=3[,rank=R]           a NaN in one gradient after the gradient reduction
    spike,step=3,scale=50              loss and gradients multiplied by `scale` (a loss spike)
    sigterm,step=3[,rank=R]            SIGTERM to this process during the step (preemption)
    sigusr1,step=3[,rank=R]            SIGUSR1 likewise (Slurm's `--signal=USR1@...`)
    sigkill,step=3,rank=R              SIGKILL during the step, first launch attempt only
                                       ($TORCHELASTIC_RESTART_COUNT unset or 0)
    sleep,step=3,rank=R,seconds=S      sleep S s inside the gradient-reduction phase (a hung collective)

Nothing reads the variable unless it is set; a malformed value is a ConfigError naming it.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch

from moe_train.config import ConfigError

ENV = "MOE_TRAIN_FAULTS"
KINDS = ("nan_grad", "spike", "sigterm", "sigusr1", "sigkill", "sleep")


@dataclass(frozen=True)
class Fault:
    """One injected fault."""

    kind: str
    step: int
    rank: int | None = None
    scale: float = 100.0
    seconds: float = 0.0


def parse_faults(text: str) -> list[Fault]:
    """Parse MOE_TRAIN_FAULTS (see the module docstring)."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, *pairs = item.split(",")
        try:
            values = dict(pair.split("=", 1) for pair in pairs)
            if kind not in KINDS or "step" not in values or set(values) - {"step", "rank", "scale", "seconds"}:
                raise ValueError
            rank = int(values["rank"]) if "rank" in values else None
            fault = Fault(kind, int(values["step"]), rank, float(values.get("scale", 100.0)))
            faults.append(Fault(fault.kind, fault.step, rank, fault.scale, float(values.get("seconds", 0.0))))
        except ValueError:
            raise ConfigError(
                f"{ENV} entry {item!r} must be kind,step=N[,rank=R][,scale=X][,seconds=S] with kind in {KINDS}"
            ) from None
    return faults


class FaultInjector:
    """The faults of this rank; the trainer calls the hooks at fixed points of a step."""

    def __init__(self, rank: int, text: str | None = None) -> None:
        text = os.environ.get(ENV, "") if text is None else text
        self.faults = [f for f in parse_faults(text) if f.rank is None or f.rank == rank]

    def _due(self, kind: str, step: int) -> list[Fault]:
        return [f for f in self.faults if f.kind == kind and f.step == step]

    def during_step(self, step: int) -> None:
        """After the forward/backward: signals (the step then finishes as a real one would)."""
        if self._due("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._due("sigusr1", step):
            os.kill(os.getpid(), signal.SIGUSR1)
        if self._due("sigkill", step) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") in ("", "0"):
            os.kill(os.getpid(), signal.SIGKILL)

    def in_grad_reduce(self, step: int) -> None:
        """Inside the gradient-reduction phase, before its collectives: a rank that hangs."""
        for fault in self._due("sleep", step):
            time.sleep(fault.seconds)

    def corrupt(self, step: int, params: list[torch.nn.Parameter]) -> float:
        """After the gradient reduction: NaN / spiked gradients; returns the factor for the step's loss."""
        grads = [p.grad for p in params if p.grad is not None]
        if self._due("nan_grad", step) and grads:
            grads[0].view(-1)[0] = float("nan")
        factor = 1.0
        for fault in self._due("spike", step):
            factor *= fault.scale
            for grad in grads:
                grad.mul_(fault.scale)
        return factor
