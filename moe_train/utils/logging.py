"""Rank-aware logging: rank 0 logs at the configured level, other ranks only warnings and errors."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

LOGGER_NAME = "moe_train"


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """The package logger (or a child of it)."""
    return logging.getLogger(name)


def setup_logging(level: str = "INFO", rank: int | None = None) -> None:
    """Configure the moe_train logger once; non-zero ranks are quieted to WARNING."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    logger = get_logger()
    logger.setLevel(level if rank == 0 else "WARNING")
    if not logger.handlers:
        handler = logging.StreamHandler()
        prefix = f"[rank{rank}] " if rank else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False


USER_ERROR_MARKER = "moe_train-user-error"


def first_to_report_error(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process prints a user error, so a launch shows it once, not once per rank.

    A single process always does. Under torchrun the first local rank that fails does: ranks usually
    fail the same way (a bad config, a taken run directory), and a failure on one rank alone is still
    shown. The ranks of one node and attempt share torchrun's log directory (the grandparent of
    $TORCHELASTIC_ERROR_FILE), where the first creates a marker file. Other launchers: rank 0 only."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE") or 1) <= 1:
        return True
    error_file = env.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            os.close(os.open(Path(error_file).parent.parent / USER_ERROR_MARKER, os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False
        except OSError:
            pass
    return int(env.get("RANK") or 0) == 0
