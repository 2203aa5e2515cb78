"""How each local parameter relates to the single-device model: the contract between the parallel pieces.

Tensor/expert/pipeline parallelism replace or slice parameters of the single-device model; data
parallelism, gradient clipping and layout-independent checkpoints then need, for every local parameter:

- its canonical name (the FQN in the single-device model) and canonical (full) shape;
- how it is sharded: an ordered list of (group kind, dim) — the canonical tensor is split evenly along
  `dim` over the ranks of that group, rank i holding chunk i (nested in list order);
- over which group kinds its gradient must be summed (each such group's ranks compute disjoint parts of
  the same loss's gradient: "dp" for dense params, "edp" for experts, plus "tp" for params replicated
  inside a sequence-parallel region). After the sum every grad is divided by the attention-side dp size,
  because each data-parallel replica's loss is a mean over its own tokens;
- over which group kinds it is replicated (identical copies): the global grad norm counts a parameter
  only on rank 0 of each such group, so every parameter is counted exactly once.

Parameters without metadata are dense, unsharded, replicated over "dp", grads summed over "dp".
Persistent buffers (model state outside autograd, e.g. the routers' expert bias) get the same
metadata so that checkpoints store and reshard them like parameters; one without metadata is
replicated on every rank of its pipeline stage (over "dp" and "tp").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

META_ATTR = "_moe_train_meta"


@dataclass
class ParamMeta:
    """Placement of one local parameter relative to the single-device model."""

    canonical_name: str
    """FQN in the single-device model, e.g. 'layers.3.attention.wq.weight'."""
    canonical_shape: tuple[int, ...]
    """Shape in the single-device model."""
    shards: list[tuple[str, int]] = field(default_factory=list)
    """(group kind, dim) splits, outermost first; e.g. [('ep', 0), ('etp', 2)] for w1_EHF."""
    grad_sum_kinds: tuple[str, ...] = ("dp",)
    """Group kinds over which this parameter's gradient is summed before dividing by dp."""
    replicated_kinds: tuple[str, ...] = ("dp",)
    """Group kinds holding identical copies (counted once in the grad norm: on rank 0 of each)."""
    is_expert: bool = False
    """Routed-expert parameter (reduced over the expert-data-parallel group)."""


def get_meta(param: torch.Tensor) -> ParamMeta | None:
    """The metadata attached to a parameter, if any."""
    return getattr(param, META_ATTR, None)


def set_meta(param: torch.Tensor, meta: ParamMeta) -> None:
    """Attach metadata to a parameter (replacing any earlier one)."""
    setattr(param, META_ATTR, meta)


def ensure_meta(model: nn.Module, prefix: str = "") -> dict[str, ParamMeta]:
    """Give every parameter without metadata the dense default; return {local name: meta}."""
    metas = {}
    for name, param in model.named_parameters():
        meta = get_meta(param)
        if meta is None:
            meta = ParamMeta(canonical_name=prefix + name, canonical_shape=tuple(param.shape))
            set_meta(param, meta)
        metas[name] = meta
    return metas


BUFFER_REPLICATED: tuple[str, ...] = ("dp", "tp")
"""Default placement of a persistent buffer: the same on every rank of its pipeline stage."""


def named_buffers_with_meta(modules: nn.Module | list[nn.Module]) -> list[tuple[str, torch.Tensor, ParamMeta]]:
    """(local name, buffer, meta) of every persistent buffer of a module or of pipeline chunks; buffers
    without metadata get the stage-replicated default, named by their local (= canonical) name."""
    out = []
    for module in modules if isinstance(modules, list) else [modules]:
        for prefix, sub in module.named_modules():
            for key, buf in sub._buffers.items():
                if buf is None or key in sub._non_persistent_buffers_set:
                    continue
                name = f"{prefix}.{key}" if prefix else key
                meta = get_meta(buf)
                if meta is None:
                    meta = ParamMeta(name, tuple(buf.shape), [], (), BUFFER_REPLICATED)
                    set_meta(buf, meta)
                out.append((name, buf, meta))
    return out


def shard_slice(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous chunk of `full` split evenly into `size` along `dim` (a copy)."""
    if full.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} is not divisible by {size}")
    return full.chunk(size, dim=dim)[rank].contiguous().clone()


Box = tuple[list[int], list[int]]
"""(offsets, lengths) of a local shard inside its canonical tensor."""


def group_index(groups: Any, kind: str) -> int:
    """This rank's position in its group of `kind` (0 in a single process)."""
    return int(groups.ranks[kind].index(groups.rank)) if groups.size(kind) > 1 else 0


def shard_box(meta: ParamMeta, groups: Any) -> Box:
    """The box of the canonical tensor that this rank's local parameter holds (nested even splits)."""
    offsets, lengths = [0] * len(meta.canonical_shape), list(meta.canonical_shape)
    for kind, dim in meta.shards:
        size = groups.size(kind)
        if lengths[dim] % size:
            raise ValueError(
                f"{meta.canonical_name}: dim {dim} ({lengths[dim]}) is not divisible by the '{kind}' size ({size})"
            )
        lengths[dim] //= size
        offsets[dim] += group_index(groups, kind) * lengths[dim]
    return offsets, lengths


def owns_unique_copy(meta: ParamMeta, groups: Any) -> bool:
    """Whether this rank's copy is the one that counts (grad norm) and is saved: rank 0 of every
    replicated kind. Shards of a sharded parameter are distinct, so every shard owner counts."""
    return all(group_index(groups, kind) == 0 for kind in meta.replicated_kinds)
