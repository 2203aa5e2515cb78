"""Checkpoint directory management: `<run.dir>/checkpoints/step_NNNNNNNN`, RNG state, train state.

The layout-independent format itself (canonical tensors in per-rank shards, atomic temp-dir + rename
save, weights_only loads) is moe_train.parallel.dist_checkpoint; a single process writes the same
format, so any run resumes under any layout. A stale temporary directory is ignored and cleaned by
the next save; the last `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_train.utils.logging import get_logger

log = get_logger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read; the message names the path."""


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resumed run needs."""

    step: int
    """Optimizer steps completed."""
    consumed_samples: int
    """Global sample index the next step starts at (the data position)."""


def checkpoint_root(run_dir: str | Path) -> Path:
    """Directory holding a run's checkpoints."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """Map checkpoint.resume ('latest', 'auto', a path, or None) to a checkpoint directory."""
    if resume is None:
        return None
    if resume == "auto":  # a requeued job: continue if an earlier run of it saved anything
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"checkpoint.resume=latest but {checkpoint_root(run_dir)} holds no checkpoint")
        return found[-1]
    path = Path(resume)
    if not (path / "index.json").is_file():
        raise CheckpointError(f"checkpoint.resume ({resume}) is not a checkpoint directory (no index.json)")
    return path


def rng_state() -> dict[str, Any]:
    """RNG states of torch, python, numpy and this rank's CUDA device, in a weights_only-loadable form.

    Training draws no random numbers after initialisation (no dropout), so rank 0's state is saved and
    restored on every rank; it matters only for user code that samples."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after creating or renaming files in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, keep_last: int) -> None:
    """Remove stale temporary directories and all but the newest `keep_last` checkpoints."""
    for stale in root.iterdir():
        if stale.name.startswith(TMP_PREFIX):
            shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_file(path: Path) -> Any:
    """torch.load with weights_only=True; a missing or damaged file is a one-line CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"checkpoint file {path} cannot be read: {str(exc).splitlines()[0]}") from None
