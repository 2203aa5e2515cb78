"""Layout-independent sharded checkpoints: save under one parallel layout, resume under any other.

Every tensor is stored under its canonical key (`model/<canonical name>`, `optim/<canonical name>/
exp_avg`, `.../exp_avg_sq`, `.../step`) as chunks of the canonical (single-device) tensor. `model/`
holds the trainable parameters and the persistent buffers (model state outside autograd, e.g. the
routers' expert bias), placed and resharded alike through their ParamMeta:

    <dir>/shard_<rank>.pt    {key: this rank's chunk}     (only unique copies: rank 0 of every
                                                            replicated kind of the parameter)
    <dir>/index.json         {key: {shape, dtype, chunks: [{file, offsets, lengths}]}}
    <dir>/trainer.pt         TrainState and rank 0's RNG state;  <dir>/config.json
    <dir>/manifest.json      {file: {bytes, sha256}}, written last (verified on resume)

A chunk's box follows from ParamMeta.shards: the canonical tensor is split evenly along each (kind, dim)
in list order, this rank taking chunk `group_index(kind)`. Loading computes the box each local
parameter needs under the *current* layout and copies the intersections with the stored chunks, so
tp2·ep2·pp2 → dp4·ep4 → one process all work. Optimizer state follows its parameter; ZeRO-1 chunks are
gathered into local canonical form on save and re-partitioned on load (moe_train.parallel.zero).

Saves are atomic (moe_train.parallel.checkpoint_files): ranks write into `.tmp-step_N`, rank 0 merges the
index after a barrier and renames the directory into place; a crash at any point leaves the previous
checkpoint intact (the stale temporary directory is removed by the next save). Files are read with
weights_only=True (memory-mapped, so a rank reads only the chunks it needs).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_train.parallel.checkpoint_files import (
    TMP_PREFIX,
    CheckpointError,
    TrainState,
    checkpoint_root,
    fsync_dir,
    load_file,
    prune,
    rng_state,
    write_file_sum,
    write_manifest,
)
from moe_train.parallel.data_parallel import ParamsLike, named_params_with_meta
from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.param_meta import Box, ParamMeta, named_buffers_with_meta, owns_unique_copy, shard_box
from moe_train.parallel.zero import STATE_KEYS, load_optimizer_local_state, optimizer_local_state
from moe_train.utils.logging import get_logger

log = get_logger(__name__)

INDEX = "index.json"
NamedTensor = tuple[str, torch.Tensor, ParamMeta]
"""(local name, parameter or persistent buffer, its placement)."""
FORMAT = "moe_train.dist_checkpoint/1"


def is_distributed_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a checkpoint written by this module."""
    return (Path(path) / INDEX).is_file()


def _barrier(groups: ProcessGroups) -> None:
    if groups.world_size > 1:
        dist.barrier()


def _save_file(obj: Any, path: Path) -> None:
    """torch.save, then fsync: the file's bytes are on disk before the directory is renamed into place."""
    with path.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


# -- save --------------------------------------------------------------------------------------


def _model_entries(model: ParamsLike) -> list[NamedTensor]:
    """Trainable parameters, then the persistent buffers of the module(s), each with its ParamMeta."""
    entries: list[NamedTensor] = list(named_params_with_meta(model))
    modules = [model] if isinstance(model, nn.Module) else list(model)
    if all(isinstance(m, nn.Module) for m in modules):
        entries += named_buffers_with_meta([m for m in modules if isinstance(m, nn.Module)])
    return entries


def _local_chunks(
    entries: list[NamedTensor], optim_state: dict[str, dict[str, torch.Tensor]], groups: ProcessGroups
) -> dict[str, tuple[torch.Tensor, list[int], Box]]:
    """{key: (tensor, canonical shape, box)} of the unique chunks this rank writes."""
    chunks: dict[str, tuple[torch.Tensor, list[int], Box]] = {}
    for _, param, meta in entries:
        if not owns_unique_copy(meta, groups):
            continue
        box = shard_box(meta, groups)
        if list(param.shape) != box[1]:
            raise ValueError(f"{meta.canonical_name}: local shape {list(param.shape)} != its shard box {box[1]}")
        shape = list(meta.canonical_shape)
        name = meta.canonical_name
        if f"model/{name}" in chunks:
            raise ValueError(f"canonical name {name} appears twice on rank {groups.rank}")
        chunks[f"model/{name}"] = (param.detach().cpu(), shape, box)
        if name in optim_state:
            state = optim_state[name]
            for key in STATE_KEYS:
                chunks[f"optim/{name}/{key}"] = (state[key].detach().cpu(), shape, box)
            chunks[f"optim/{name}/step"] = (state["step"].detach().cpu().reshape(()), [], ([], []))
    return chunks


def _merge_index(tmp: Path, world_size: int) -> dict[str, Any]:
    """Rank 0: merge the per-rank chunk lists, drop duplicate chunks, check every tensor is covered."""
    tensors: dict[str, Any] = {}
    for rank in range(world_size):
        for key, info in json.loads((tmp / f"shard_{rank:05d}.json").read_text()).items():
            entry = tensors.setdefault(key, {"shape": info["shape"], "dtype": info["dtype"], "chunks": []})
            if entry["shape"] != info["shape"]:
                raise CheckpointError(f"{key}: rank {rank} saves shape {info['shape']}, another {entry['shape']}")
            chunk = {"file": f"shard_{rank:05d}.pt", "offsets": info["offsets"], "lengths": info["lengths"]}
            if all(c["offsets"] != chunk["offsets"] for c in entry["chunks"]):
                entry["chunks"].append(chunk)
    for key, entry in tensors.items():
        stored = sum(math.prod(c["lengths"]) for c in entry["chunks"])
        if stored != math.prod(entry["shape"]):
            raise CheckpointError(
                f"{key}: chunks cover {stored} of {math.prod(entry['shape'])} elements of shape {entry['shape']}"
            )
    return {"format": FORMAT, "world_size": world_size, "tensors": tensors}


def save_distributed_checkpoint(
    run_dir: str | Path,
    state: TrainState,
    model: ParamsLike,
    optimizer: torch.optim.Optimizer | None,
    groups: ProcessGroups,
    config: dict[str, Any],
    keep_last: int,
    extra_json: dict[str, Any] | None = None,
    checksums: bool = True,
) -> Path:
    """Every rank calls this; writes `<run_dir>/checkpoints/step_NNNNNNNN` atomically, returns it.

    extra_json: {name: JSON-able object} written by rank 0 as `<name>.json` (e.g. the data state).
    checksums: sha256 of every file in the manifest (False: sizes only, no file is read back)."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{state.step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if groups.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(groups)
    entries = _model_entries(model)  # first: gives parameters without metadata the default
    optim_state = optimizer_local_state(optimizer) if optimizer is not None else {}  # collective under ZeRO
    chunks = _local_chunks(entries, optim_state, groups)
    name = f"shard_{groups.rank:05d}"
    _save_file({key: tensor for key, (tensor, _, _) in chunks.items()}, tmp / f"{name}.pt")
    write_file_sum(tmp / f"{name}.pt", checksums)  # each rank hashes its own shard; rank 0 merges the manifest
    listing = {
        key: {"shape": shape, "dtype": str(t.dtype).removeprefix("torch."), "offsets": box[0], "lengths": box[1]}
        for key, (t, shape, box) in chunks.items()
    }
    (tmp / f"{name}.json").write_text(json.dumps(listing))
    _barrier(groups)
    if groups.rank == 0:
        for name, obj in (extra_json or {}).items():
            (tmp / f"{name}.json").write_text(json.dumps(obj))
        _commit(tmp, final, state, config, groups.world_size, keep_last, checksums)
    _barrier(groups)
    return final


def _commit(
    tmp: Path, final: Path, state: TrainState, config: dict[str, Any], world_size: int, keep: int, checksums: bool
) -> None:
    """Rank 0: index, trainer state, config; then the atomic rename and pruning."""
    (tmp / INDEX).write_text(json.dumps(_merge_index(tmp, world_size)))
    _save_file({"train_state": vars(state), "rng": rng_state()}, tmp / "trainer.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    write_manifest(tmp, checksums)  # last: a directory with a manifest that verifies is complete
    fsync_dir(tmp)
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
    if final.exists():  # re-saving a step: keep a complete copy under some name at every moment
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)
    prune(final.parent, keep)
    log.info("saved distributed checkpoint %s", final)


# -- load --------------------------------------------------------------------------------------


class _Reader:
    """Reads canonical boxes out of a checkpoint's chunks (shard files memory-mapped on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        index_path = path / INDEX
        if not index_path.is_file():
            raise CheckpointError(f"{path} is not a distributed checkpoint (no {INDEX})")
        self.index = json.loads(index_path.read_text())
        self.tensors: dict[str, Any] = self.index["tensors"]
        self._files: dict[str, dict[str, torch.Tensor]] = {}
        self.elements_read = 0
        """Elements copied out of the stored chunks so far (a rank reads only its own boxes' intersections)."""

    def _file(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._files:
            try:
                self._files[name] = torch.load(self.path / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
                raise CheckpointError(f"checkpoint file {self.path / name} cannot be read: {exc}") from None
        return self._files[name]

    def read_into(self, key: str, out: torch.Tensor, box: Box, shape: list[int]) -> None:
        """Fill `out` (shaped like the box) with that box of canonical tensor `key`."""
        if key not in self.tensors:
            raise CheckpointError(f"{self.path} has no tensor {key}")
        entry = self.tensors[key]
        if entry["shape"] != shape:
            raise CheckpointError(f"{key}: checkpoint shape {entry['shape']} != model shape {shape}")
        filled = 0
        for chunk in entry["chunks"]:
            lo = [max(a, b) for a, b in zip(chunk["offsets"], box[0], strict=True)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(chunk["offsets"], chunk["lengths"], *box, strict=True)]
            if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
                continue
            src = self._file(chunk["file"])[key]
            src = src[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, chunk["offsets"], strict=True))]
            dst = out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, box[0], strict=True))]
            dst.copy_(src)
            filled += src.numel()
            self.elements_read += src.numel()
        if filled != out.numel():
            raise CheckpointError(f"{key}: stored chunks fill {filled} of the {out.numel()} elements of box {box}")


@torch.no_grad()
def load_distributed_checkpoint(
    path: str | Path, model: ParamsLike, optimizer: torch.optim.Optimizer | None, groups: ProcessGroups
) -> tuple[TrainState, dict[str, Any]]:
    """Load parameters (and optimizer state) for this rank's layout; returns (TrainState, RNG state).

    Optimizer hyperparameters stay those of `optimizer` (they come from the config and the schedule).
    """
    reader = _Reader(Path(path))
    entries = _model_entries(model)
    optim_state: dict[str, dict[str, torch.Tensor]] = {}
    for _, param, meta in entries:
        box, shape, name = shard_box(meta, groups), list(meta.canonical_shape), meta.canonical_name
        reader.read_into(f"model/{name}", param.data, box, shape)
        if optimizer is not None and f"optim/{name}/step" in reader.tensors:
            state = {key: torch.empty_like(param) for key in STATE_KEYS}
            for key, tensor in state.items():
                reader.read_into(f"optim/{name}/{key}", tensor, box, shape)
            step = torch.zeros((), dtype=torch.float32)
            reader.read_into(f"optim/{name}/step", step, ([], []), [])
            optim_state[name] = {"step": step, **state}
    if optimizer is not None:
        load_optimizer_local_state(optimizer, optim_state)  # collective-free; ZeRO keeps its chunk
    trainer = load_file(Path(path) / "trainer.pt")
    return TrainState(**trainer["train_state"]), trainer["rng"]


def load_canonical_tensors(path: str | Path, prefix: str = "model/") -> dict[str, torch.Tensor]:
    """Every full canonical tensor whose key starts with `prefix` (prefix removed); for inspection, export
    and tests, in one process."""
    reader = _Reader(Path(path))
    out = {}
    for key, entry in reader.tensors.items():
        if key.startswith(prefix):
            tensor = torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"]))
            reader.read_into(key, tensor, ([0] * len(entry["shape"]), list(entry["shape"])), entry["shape"])
            out[key.removeprefix(prefix)] = tensor
    return out
