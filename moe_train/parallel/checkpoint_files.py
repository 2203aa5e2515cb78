"""Checkpoint files: `<run.dir>/checkpoints/step_NNNNNNNN`, the manifest, RNG state, train state.

The layout-independent format itself (canonical tensors in per-rank shards, atomic temp-dir + rename
save, weights_only loads) is moe_train.parallel.dist_checkpoint; a single process writes the same
format, so any run resumes under any layout. A stale temporary directory is ignored and cleaned by
the next save; the last `keep_last` checkpoints are kept.

Every checkpoint ends with `manifest.json` ({file: {bytes, sha256}} of every other file), written last
before the directory is renamed into place. `resolve_resume` verifies it: `latest`/`auto` take the
newest checkpoint that verifies and warn about each newer one that does not (naming the file and what
is wrong); an explicit path that fails is refused. A checkpoint without a manifest (written before
manifests existed) is loaded with a warning that it cannot be verified. See docs/fault_tolerance.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moe_train.utils.logging import get_logger

log = get_logger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "moe_train.manifest/1"
SUM_SUFFIX = ".sha256"
"""A rank's `<shard file>.sha256` ("<hex> <bytes>"), merged into the manifest and removed by rank 0."""
VERIFY_MODES: tuple[str, ...] = ("sha256", "size")


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


def resolve_resume(
    run_dir: str | Path, resume: str | None, verify: str = "sha256", rank: int = 0, world_size: int = 1
) -> Path | None:
    """Map checkpoint.resume ('latest', 'auto', a path, or None) to a verified checkpoint directory.

    'latest' / 'auto' fall back to the newest checkpoint that verifies, warning about each newer one
    that does not; an explicit path that does not verify is a CheckpointError. With world_size > 1 every
    rank must call this (torch.distributed initialized): each hashes its share of the files and the
    ranks agree on the verdict (`agree_on_problem`)."""
    if resume is None:
        return None
    if resume in ("auto", "latest"):
        found = list_checkpoints(run_dir)
        if not found and resume == "auto":  # a requeued job: continue if an earlier run of it saved anything
            return None
        if not found:
            raise CheckpointError(f"checkpoint.resume=latest but {checkpoint_root(run_dir)} holds no checkpoint")
        for path in reversed(found):
            problem = agree_on_problem(verify_checkpoint(path, verify, rank, world_size), world_size)
            if problem is None:
                return path
            log.warning("checkpoint %s is damaged (%s); falling back to the previous one", path, problem)
        raise CheckpointError(
            f"checkpoint.resume={resume}: no checkpoint in {checkpoint_root(run_dir)} verifies (newest: {found[-1]})"
        )
    path = Path(resume)
    if not (path / "index.json").is_file():
        raise CheckpointError(f"checkpoint.resume ({resume}) is not a checkpoint directory (no index.json)")
    problem = agree_on_problem(verify_checkpoint(path, verify, rank, world_size), world_size)
    if problem is not None:
        raise CheckpointError(f"checkpoint.resume ({resume}) fails verification: {problem}")
    return path


# -- manifest ------------------------------------------------------------------------------------


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def write_file_sum(path: Path, checksum: bool = True) -> None:
    """A rank records the digest of a file it wrote (`<file>.sha256`), for rank 0's manifest; without
    `checksum` only its size ('-' for the digest)."""
    hexdigest, size = file_digest(path) if checksum else ("-", path.stat().st_size)
    path.with_name(path.name + SUM_SUFFIX).write_text(f"{hexdigest} {size}\n")


def write_manifest(directory: Path, checksum: bool = True) -> None:
    """Rank 0, last file of a save: digests of every file (from the ranks' `.sha256` files where present);
    without `checksum` sizes only (sha256 null)."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.iterdir()):
        if path.name == MANIFEST or path.name.endswith(SUM_SUFFIX) or not path.is_file():
            continue
        summed = path.with_name(path.name + SUM_SUFFIX)
        if summed.is_file():
            hexdigest, size_text = summed.read_text().split()
            size = int(size_text)
        else:
            hexdigest, size = file_digest(path) if checksum else ("-", path.stat().st_size)
        files[path.name] = {"bytes": size, "sha256": None if hexdigest == "-" else hexdigest}
    for summed in directory.glob(f"*{SUM_SUFFIX}"):
        summed.unlink()
    with (directory / MANIFEST).open("w") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def agree_on_problem(problem: str | None, world_size: int) -> str | None:
    """The first rank's problem if any rank found one (a collective when world_size > 1)."""
    if world_size == 1 or not dist.is_initialized():
        return problem
    problems: list[str | None] = [None] * world_size
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)


def verify_checkpoint(path: Path, mode: str = "sha256", rank: int = 0, world_size: int = 1) -> str | None:
    """None when every file of the manifest is present with its size (and sha256 for mode 'sha256');
    else what is wrong, naming the file. A checkpoint without a manifest passes with a warning.

    Every rank checks every size; the checksums are shared out: rank r hashes the files i (in name order)
    with i % world_size == r, so a large checkpoint is read once over all ranks, not once per rank."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        log.warning("checkpoint %s has no %s (written by an older version): it cannot be verified", path, MANIFEST)
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            return f"{manifest_path} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"{manifest_path} cannot be read ({exc.__class__.__name__})"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{file} has {size} bytes, the manifest says {entry['bytes']} (truncated?)"
    for i, (name, entry) in enumerate(sorted(files.items())):
        if mode != "sha256" or i % world_size != rank or entry["sha256"] is None:  # None: saved size-only
            continue
        if file_digest(path / name)[0] != entry["sha256"]:
            return f"{path / name} does not match its sha256 in the manifest (corrupted)"
    return None


def saved_config(path: str | Path) -> dict[str, Any] | None:
    """The config a checkpoint was written with (its config.json), or None when it has none."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


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
