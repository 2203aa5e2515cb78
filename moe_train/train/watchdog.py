"""Hang watchdog: a thread that fails the process fast when a step takes far longer than usual.

The trainer marks each step (`step_started` / `step_finished`) and its phases on the process tracker
(moe_train.utils.phases: data, forward, backward, dispatch all-to-all, grad reduce, optimizer,
checkpoint). After `train.watchdog.warmup_steps` steps, a step running longer than
max(floor_s, multiple x median step time) - or a checkpoint save running longer than checkpoint_s -
makes the thread log one line naming the rank, the step and the phase, then `os._exit(exit_code)`, so
torchrun (--max-restarts) restarts the job from its last checkpoint instead of it hanging in a
collective until the collective timeout (parallel.collective_timeout_s) or forever.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable

from moe_train.config import WatchdogConfig
from moe_train.utils.logging import get_logger
from moe_train.utils.phases import PHASES, PhaseTracker

log = get_logger(__name__)


class Watchdog:
    """Watches the steps of one rank; `exit_fn` is os._exit except in tests."""

    def __init__(
        self,
        cfg: WatchdogConfig,
        rank: int,
        tracker: PhaseTracker = PHASES,
        exit_fn: Callable[[int], None] = os._exit,
    ) -> None:
        self.cfg, self.rank, self.tracker, self.exit_fn = cfg, rank, tracker, exit_fn
        self.durations: deque[float] = deque(maxlen=100)
        self._lock = threading.Lock()
        self._started: float | None = None
        self._limit: float | None = None
        self._step = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired: str | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.multiple > 0

    def start(self) -> None:
        """Start the watching thread (a daemon: it never keeps the process alive)."""
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moe-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def step_started(self, step: int) -> None:
        """A step begins; it is watched once warm-up is over."""
        with self._lock:
            self._step, self._started = step, time.monotonic()
            warm = len(self.durations) >= self.cfg.warmup_steps
            median = statistics.median(self.durations) if self.durations else 0.0
            self._limit = max(self.cfg.floor_s, self.cfg.multiple * median) if warm else None

    def step_finished(self, seconds: float) -> None:
        """The step ended after `seconds`."""
        with self._lock:
            self.durations.append(seconds)
            self._started = self._limit = None

    def checkpoint_started(self) -> None:
        """A checkpoint save begins (watched with checkpoint_s)."""
        with self._lock:
            self._started, self._limit = time.monotonic(), self.cfg.checkpoint_s

    def checkpoint_finished(self) -> None:
        with self._lock:
            self._started = self._limit = None

    def check(self) -> str | None:
        """The failure line when the current step or save is over its limit (else None)."""
        with self._lock:
            if self._started is None or self._limit is None:
                return None
            elapsed = time.monotonic() - self._started
            if elapsed <= self._limit:
                return None
            median = statistics.median(self.durations) if self.durations else 0.0
            return (
                f"watchdog: rank {self.rank} stuck in phase '{self.tracker.current()}' ({self.tracker.path()}) of"
                f" step {self._step} for {elapsed:.1f} s (limit {self._limit:.1f} s, median step {median:.2f} s);"
                f" exiting with code {self.cfg.exit_code} so the launcher restarts from the last checkpoint"
            )

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            line = self.check()
            if line is not None:
                self.fired = line
                log.error(line)
                self.exit_fn(self.cfg.exit_code)
                return
