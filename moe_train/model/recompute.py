"""Activation recompute (`train.recompute`) and the guard that keeps a replayed forward's side effects
from happening twice.

Modes:

* ``none``: every activation of the forward is kept for backward.
* ``selective``: the attention core (softmax(q k^T) v) and the SwiGLU body of every MLP (routed experts,
  shared experts, dense MLP) are recomputed in backward; their inputs are kept, their intermediates
  (the [B, N, S, S] scores where the attention kernel keeps them, and 3-4 [tokens, ffn] tensors per MLP)
  are not. The recomputed regions are local math: no collective, no router, nothing counted.
* ``full``: each transformer block keeps only its input; the whole block (attention, router, dispatch
  with its all-to-alls, experts) runs again in backward (Chen et al., arXiv 1604.06174; Megatron-LM's
  full recompute, arXiv 2205.05198). Collectives inside a block are replayed by every rank of their
  group at the same point of backward, so they stay matched.

Both use `torch.utils.checkpoint` without reentrancy: the original forward's autograd graph is kept and
the recompute only refills the tensors it saved, so the aux-loss gradient hooked onto a block output is
applied once. What must not run twice is the MoE layers' bookkeeping: the per-step routing counts of the
global-batch LBL and of the routing analytics, the streaming LBL's running counts (and their
all-reduce) and `last_stats`. Megatron-LM double-counted router statistics under recompute (its issue
#1330). A `ReplayLog` per checkpointed call holds the results of those calls: the forward records them,
the recompute reads them back in the same order instead of calling again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import torch
from torch.utils.checkpoint import checkpoint

RECOMPUTE_MODES = ("none", "selective", "full")
"""Values of train.recompute."""

T = TypeVar("T")


class ReplayLog:
    """Side effects of one checkpointed call: recorded in the forward, served back in the recompute."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.replaying = False
        self.position = 0

    def once(self, fn: Callable[[], T]) -> T:
        """`fn()` in the forward (result recorded); the recorded result, without calling, in the recompute."""
        if not self.replaying:
            value = fn()
            self.values.append(value)
            return value
        value = self.values[self.position]
        self.position += 1
        return value  # type: ignore[no-any-return]


class ReplayGuarded:
    """Mixin for modules with side effects inside a recomputed region; `replay_log` is set while a
    checkpointed call runs (None outside one)."""

    replay_log: ReplayLog | None = None

    def once(self, fn: Callable[[], T]) -> T:
        """Run `fn` once per forward, also when the forward is replayed for recompute."""
        log = self.replay_log
        return fn() if log is None else log.once(fn)

    @property
    def replaying(self) -> bool:
        """True while the forward runs again for recompute."""
        return self.replay_log is not None and self.replay_log.replaying


@contextmanager
def _attach(modules: Sequence[ReplayGuarded], log: ReplayLog, replaying: bool) -> Iterator[None]:
    log.replaying, log.position = replaying, 0
    previous = [m.replay_log for m in modules]
    for m in modules:
        m.replay_log = log
    try:
        yield
    finally:
        for m, prev in zip(modules, previous, strict=True):
            m.replay_log = prev


def checkpoint_guarded(fn: Callable[..., torch.Tensor], module: torch.nn.Module, *args: Any) -> torch.Tensor:
    """`fn(*args)` under non-reentrant checkpointing; side effects of `module`'s ReplayGuarded submodules
    run once (see the module docstring)."""
    guarded = [m for m in module.modules() if isinstance(m, ReplayGuarded)]
    log = ReplayLog()

    def contexts() -> tuple[AbstractContextManager, AbstractContextManager]:
        return _attach(guarded, log, replaying=False), _attach(guarded, log, replaying=True)

    out: torch.Tensor = checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)
    return out


def checkpoint_local(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """`fn(*args)` under non-reentrant checkpointing when autograd records (a region without side effects)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    out: torch.Tensor = checkpoint(fn, *args, use_reentrant=False)
    return out
