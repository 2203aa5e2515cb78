"""Differentiable collectives for tensor/sequence/expert parallel regions (Megatron-LM's conventions).

Inside a tensor-parallel group every rank computes the *same* loss (replicated), so the backward of a
forward all-reduce is the identity and vice versa:

- `reduce_from_region`:       fwd all-reduce (sum),         bwd identity
- `gather_from_sequence`:     fwd all-gather along dim,     bwd reduce-scatter (sum) along dim
- `reduce_scatter_to_sequence`: fwd reduce-scatter along dim, bwd all-gather along dim

All take `group=None` with `size == 1` as the single-process case (identity). gloo has no
reduce-scatter, so it is an all-reduce plus a local chunk there (same numbers, more bytes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def all_gather_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    parts = [torch.empty_like(x.contiguous()) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"reduce_scatter: dim {dim} of size {x.shape[dim]} not divisible by group size {size}")
    if dist.get_backend(group) == "nccl":
        chunks = [c.contiguous() for c in x.chunk(size, dim=dim)]
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, chunks, group=group)
        return out
    return all_reduce_sum(x, group).chunk(size, dim=dim)[group_rank(group)].contiguous()


def split_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"split: dim {dim} of size {x.shape[dim]} not divisible by group size {size}")
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        return all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return all_gather_dim(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return reduce_scatter_dim(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return reduce_scatter_dim(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return all_gather_dim(grad, ctx.dim, ctx.group), None, None


def reduce_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum over `group` forward; identity backward (every rank holds the same loss)."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def gather_from_sequence(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """All-gather along `dim`; reduce-scatter (sum) in backward."""
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, dim, group)


def reduce_scatter_to_sequence(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sum over `group` and keep this rank's chunk along `dim`; all-gather in backward."""
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, dim, group)


def all_reduce_max(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Element-wise max over `group` (not differentiable; a copy, the input is left alone)."""
    if group_size(group) == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out
