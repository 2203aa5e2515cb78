"""Console progress on rank 0: a tqdm bar (steps, loss, tokens/s and the trainer's ETA).

The bar complements the periodic log lines (which carry the same ETA and go to every log file); it is
drawn on rank 0 only, when stderr is a terminal (`log.progress_bar: auto`), always (`always`, e.g. for a
terminal multiplexer that hides the TTY) or never (`never`). While it is shown, the moe_train logger
writes through tqdm so that log lines do not tear the bar. Other ranks draw nothing: they log only
warnings and errors, prefixed with their rank (moe_train.utils.logging).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from moe_train.utils.logging import get_logger

BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def format_eta(seconds: float) -> str:
    """H:MM:SS (days spelled out past 24 h)."""
    total = max(0, round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


class ProgressBar:
    """A step bar for steps [start, total); no-op unless shown (see the module docstring)."""

    def __init__(self, total: int, start: int, mode: str, is_main: bool) -> None:
        self.bar: Any = None
        self._redirect = contextlib.ExitStack()
        shown = is_main and (mode == "always" or (mode == "auto" and sys.stderr.isatty()))
        if not shown:
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._redirect.enter_context(logging_redirect_tqdm(loggers=[get_logger()]))
        self.bar = tqdm(
            total=total, initial=start, desc="train", unit="step", bar_format=BAR_FORMAT, dynamic_ncols=True
        )

    def update(self, record: dict[str, Any], eta_s: float) -> None:
        """Advance one step; the postfix shows the step's loss, throughput and the ETA."""
        if self.bar is None:
            return
        self.bar.set_postfix_str(
            f"loss {record['loss']:.4f}, {record['tokens_per_s']:,.0f} tok/s, ETA {format_eta(eta_s)}", refresh=False
        )
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._redirect.close()
