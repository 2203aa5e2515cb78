"""Which phase of a training step this process is in (data, forward, dispatch all-to-all, ...).

One tracker per process (`PHASES`): the phases are marked deep inside the model (the expert-parallel
all-to-all) where no trainer object reaches, and a process trains one model at a time. The watchdog
(moe_train.train.watchdog) reads it from its own thread to say where a stuck rank is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager


class PhaseTracker:
    """A stack of named phases; `current()` is the innermost one, `since()` when it began."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stack: list[tuple[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Mark the enclosed code as phase `name` (phases nest)."""
        with self._lock:
            self._stack.append((name, time.monotonic()))
        try:
            yield
        finally:
            with self._lock:
                self._stack.pop()

    def current(self) -> str:
        """The innermost phase, or 'idle'."""
        with self._lock:
            return self._stack[-1][0] if self._stack else "idle"

    def path(self) -> str:
        """Every open phase, outermost first ('step > backward > dispatch all-to-all')."""
        with self._lock:
            return " > ".join(name for name, _ in self._stack) or "idle"


PHASES = PhaseTracker()


def phase(name: str) -> AbstractContextManager[None]:
    """`with phase("forward"): ...` on the process tracker."""
    return PHASES.phase(name)
