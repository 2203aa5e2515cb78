"""Rank-aware logging: rank 0 logs at the configured level, other ranks only warnings and errors."""

from __future__ import annotations

import logging
import os

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
