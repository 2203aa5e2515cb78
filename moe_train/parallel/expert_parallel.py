"""Expert parallelism (EP), expert tensor parallelism (ETP) and router statistics under sequence parallelism.

`apply_expert_parallel(model, groups)` changes every `MoELayer` in a model (full, or a pruned pipeline
stage) in place:

1. Routed experts keep this rank's slice of the full init: experts [ep_rank*E/ep, (ep_rank+1)*E/ep),
   and with etp > 1 its chunk of the expert ffn dimension (w1/w3 on dim 2, w2 on dim 1). Each gets a
   `ParamMeta` (shards [("ep", 0), ("etp", d)], gradients summed over "edp").
2. With ep * etp > 1 the dispatcher becomes an `AllToAllDispatcher` (same dispatch/combine contract;
   the dispatched rows cross the EP all-to-all in moe.dispatch.dtype, FP8 as uint8 bytes + scales).
3. With tp > 1 the layer's tokens are one sequence-parallel shard of the micro-batch, so its router
   statistics are summed over the tp group (`SequenceShardStats`): LBL, z-loss and the reported
   `last_stats` then equal those of the whole micro-batch on one device.

Capacity (moe.capacity_factor) is decided by each rank on the tokens it routes: under tp > 1 that is
per sequence shard, capacity = ceil(cf * (T / tp) * k / E), so drops differ from a single device run
on the whole micro-batch (dropless runs match exactly).

Legend: T tokens on this rank, H hidden, E experts (global), L local experts (E / ep), K top_k,
N token copies, R ranks of the EP group, S sources (etp * ep ranks whose copies reach this rank).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_train.kernels import dispatch_rows, unpermute
from moe_train.model.moe.dispatcher import DispatchContext, TokenDispatcher
from moe_train.model.moe.layer import MoELayer
from moe_train.model.moe.router import Routing
from moe_train.parallel.collectives import (
    Group,
    all_gather_dim,
    gather_from_sequence,
    group_size,
    reduce_from_region,
    reduce_scatter_to_sequence,
)
from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.param_meta import ParamMeta, get_meta, set_meta, shard_slice
from moe_train.utils.phases import phase

logger = logging.getLogger(__name__)

EXPERT_WEIGHTS: dict[str, int] = {"w1_EHF": 2, "w3_EHF": 2, "w2_EFH": 1}
"""Routed-expert parameter name -> the ffn dimension that expert tensor parallelism splits."""


# ---------------------------------------------------------------------------------------------
# Router statistics over sequence-parallel shards


def sum_counts(counts_E: torch.Tensor, group: Group) -> torch.Tensor:
    """Per-expert assignment counts summed over `group` (detached; no gradient flows through counts)."""
    if group_size(group) == 1:
        return counts_E
    out = counts_E.detach().clone()
    dist.all_reduce(out, group=group)
    return out


def reduce_routing_stats(routing: Routing, group: Group) -> Routing:
    """The aux-loss statistics of `routing` summed over the equal-size token shards held by `group`.

    counts and prob_sum are sums, num_tokens * size, z_loss the mean over all shards' tokens; the
    per-sequence statistics of the sequence scope (when present) are summed likewise, since the shards
    are pieces of the same sequences. The differentiable parts go through `reduce_from_region`
    (forward sum, backward identity): every rank holds the same aux loss, and its gradient reaches each
    rank's own router through its own tokens.
    """
    size = group_size(group)
    if size == 1:
        return routing
    num_experts = routing.prob_sum_E.shape[-1]
    seq_counts_BE, seq_prob_sum_BE = routing.seq_counts_BE, routing.seq_prob_sum_BE
    per_seq = seq_counts_BE is not None and seq_prob_sum_BE is not None
    parts = [routing.prob_sum_E, (routing.z_loss * routing.num_tokens).reshape(1)]
    counts = [routing.tokens_per_expert_E]
    if seq_counts_BE is not None and seq_prob_sum_BE is not None:
        parts.append(seq_prob_sum_BE.flatten())
        counts.append(seq_counts_BE.flatten())
    packed = reduce_from_region(torch.cat(parts), group)
    counts_packed = sum_counts(torch.cat(counts), group)
    total_tokens = routing.num_tokens * size
    reduced = dataclasses.replace(
        routing,
        tokens_per_expert_E=counts_packed[:num_experts],
        prob_sum_E=packed[:num_experts],
        num_tokens=total_tokens,
        z_loss=packed[num_experts] / total_tokens,
    )
    if per_seq and seq_counts_BE is not None:
        reduced.seq_prob_sum_BE = packed[num_experts + 1 :].view(seq_counts_BE.shape)
        reduced.seq_counts_BE = counts_packed[num_experts:].view(seq_counts_BE.shape)
        reduced.seq_len = routing.seq_len * size
    return reduced


@dataclass
class SequenceShardStats:
    """`MoELayer.stats_reducer` under sequence parallelism: sums router statistics over the tp group.

    The micro-batch-scope LBL is over all tokens of the micro-batch, which the tp ranks of a DP replica
    hold as contiguous sequence shards of equal size.
    """

    group: Group

    def __call__(self, routing: Routing) -> Routing:
        return reduce_routing_stats(routing, self.group)

    def __deepcopy__(self, memo: dict[int, Any]) -> SequenceShardStats:
        """Stateless, and process groups cannot be copied: model copies (pipeline chunks) share it."""
        return self


# ---------------------------------------------------------------------------------------------
# Differentiable variable-size collectives


class _AllToAllRows(torch.autograd.Function):
    """Rows of x_NH sent in `send_splits` chunks to the group's ranks; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx: Any, x_NH: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Group) -> Any:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all(x_NH, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx: Any, grad_NH: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _all_to_all(grad_NH, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def _all_to_all(x_NH: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Group) -> torch.Tensor:
    if x_NH.shape[0] != sum(send_splits):
        raise ValueError(f"all-to-all: {x_NH.shape[0]} rows but send splits {send_splits} sum to {sum(send_splits)}")
    out_NH = x_NH.new_empty((sum(recv_splits), *x_NH.shape[1:]))
    with phase("dispatch all-to-all"):  # named by the hang watchdog
        dist.all_to_all_single(out_NH, x_NH.contiguous(), recv_splits, send_splits, group=group)
    return out_NH


def all_to_all_rows(x_NH: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Group) -> torch.Tensor:
    """Differentiable all-to-all of variable-size row blocks (zero-size blocks allowed)."""
    if group_size(group) == 1:
        return x_NH
    out: torch.Tensor = _AllToAllRows.apply(x_NH, send_splits, recv_splits, group)
    return out


def all_to_all_counts(send_counts_RL: torch.Tensor, group: Group) -> torch.Tensor:
    """Row r of the result: the per-local-expert counts that EP rank r sends to this rank."""
    if group_size(group) == 1:
        return send_counts_RL
    recv_counts_RL = torch.empty_like(send_counts_RL)
    dist.all_to_all_single(recv_counts_RL, send_counts_RL.contiguous(), group=group)
    return recv_counts_RL


def gather_rows(x_NH: torch.Tensor, rows: list[int], group: Group) -> torch.Tensor:
    """All-gather rank-varying row blocks (rank i holds rows[i]) in rank order; backward sums the
    gradients of every rank's copy (pad to the largest block, equal-size gather, unpad)."""
    size = group_size(group)
    if size == 1 or max(rows) == 0:
        return x_NH
    pad = max(rows)
    padded_NH = F.pad(x_NH, (0, 0, 0, pad - x_NH.shape[0]))
    gathered_GNH = gather_from_sequence(padded_NH, 0, group).view(size, pad, *x_NH.shape[1:])
    return torch.cat([gathered_GNH[i, :n] for i, n in enumerate(rows)])


def reduce_scatter_rows(y_NH: torch.Tensor, rows: list[int], group: Group) -> torch.Tensor:
    """Inverse of `gather_rows`: sum the row blocks over the group and keep this rank's block."""
    size = group_size(group)
    if size == 1 or max(rows) == 0:
        return y_NH
    pad = max(rows)
    blocks = [F.pad(b, (0, 0, 0, pad - n)) for b, n in zip(torch.split(y_NH, rows), rows, strict=True)]
    mine_NH = reduce_scatter_to_sequence(torch.cat(blocks), 0, group)
    return mine_NH[: rows[dist.get_rank(group)]]


def regroup_index(counts_SL: torch.Tensor) -> torch.Tensor:
    """Gather index turning rows ordered (source, local expert) into (local expert, source) order."""
    num_sources, num_local = counts_SL.shape
    flat = counts_SL.reshape(-1)
    starts_LS = (torch.cumsum(flat, 0) - flat).view(num_sources, num_local).t().reshape(-1)
    lens_LS = counts_SL.t().reshape(-1)
    chunk_N = torch.repeat_interleave(torch.arange(lens_LS.numel(), device=flat.device), lens_LS)
    out_starts = torch.cumsum(lens_LS, 0) - lens_LS
    pos_N = torch.arange(chunk_N.numel(), device=flat.device)
    return starts_LS[chunk_N] + pos_N - out_starts[chunk_N]


def inverse_permutation(index_N: torch.Tensor) -> torch.Tensor:
    """inv such that x[index][inv] == x."""
    inv_N = torch.empty_like(index_N)
    inv_N[index_N] = torch.arange(index_N.numel(), device=index_N.device)
    return inv_N


# ---------------------------------------------------------------------------------------------
# All-to-all dispatcher


@dataclass
class AllToAllContext(DispatchContext):
    """What `AllToAllDispatcher.combine` needs: the local unpermute plus the exchange's bookkeeping."""

    send_splits: list[int]
    """Rows this rank sent to each EP rank."""
    recv_splits: list[int]
    """Rows this rank received from each EP rank."""
    etp_rows: list[int]
    """Rows each ETP rank received from its EP exchange (gathered over etp; [n] when etp == 1)."""
    regroup_idx_N: torch.Tensor
    """Gather index from received (source, local expert) order to local-expert order."""


@dataclass
class AllToAllExchange:
    """The EP all-to-all as a `moe_train.kernels.RowExchange`: row blocks of `send_splits` to each rank.

    `send` carries any row-aligned tensors (FP8 payload and scales travel as uint8 bytes: gloo has no
    float8); `send_back` returns a gradient in its own dtype. Neither records autograd history:
    `dispatch_rows` owns the backward.
    """

    send_splits: list[int]
    recv_splits: list[int]
    group: Group

    def send(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if group_size(self.group) == 1:
            return list(tensors)
        return [_all_to_all(t, self.send_splits, self.recv_splits, self.group) for t in tensors]

    def send_back(self, grad_NH: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return grad_NH
        return _all_to_all(grad_NH, self.recv_splits, self.send_splits, self.group)


@dataclass
class CountExchange:
    """The split sizes of one layer's exchange, on the host (one device-to-host copy)."""

    counts_SL: torch.Tensor
    """Copies per (source, local expert) that reach this rank; sources ordered (etp rank, ep rank)."""
    send_splits: list[int]
    """Rows this rank sends to each EP rank."""
    recv_splits: list[int]
    """Rows this rank receives from each EP rank."""
    etp_rows: list[int]
    """Rows each ETP rank receives from its EP exchange."""
    local_splits: list[int]
    """Rows per local expert after the ETP gather (the experts' split sizes)."""


class AllToAllDispatcher(TokenDispatcher):
    """Expert-parallel dispatcher: route -> exchange counts -> permute + wire cast/FP8 + exchange rows ->
    regroup -> experts -> reverse.

    dispatch: local capacity drops and row map by global expert id (`route`), exchange per-expert counts,
    then the permuted token rows over the EP group (variable splits) in moe.dispatch.dtype
    (`dispatch_rows`: fused permute + FP8 quantisation, bytes on the wire, dequantised on arrival,
    straight-through backward in the gradient's dtype); with etp > 1 all-gather them over the ETP group,
    and group the received rows by local expert. combine: undo each step in the activation dtype; with
    etp > 1 the partial expert outputs (ffn-sharded w2) are summed by a reduce-scatter over ETP.
    """

    def __init__(self, base: TokenDispatcher, groups: ProcessGroups) -> None:
        super().__init__(
            base.num_experts, base.capacity_factor, base.drop_policy, dtype=base.dtype, backend=base.backend
        )
        self.ep_group, self.ep_size = groups.ep, groups.ep_size
        self.etp_group, self.etp_size, self.etp_rank = groups.etp, groups.etp_size, groups.etp_rank
        self.num_local = base.num_experts // groups.ep_size

    def __deepcopy__(self, memo: dict[int, Any]) -> AllToAllDispatcher:
        """Stateless, and process groups cannot be copied: model copies (pipeline chunks) share it."""
        return self

    def dispatch(self, x_TH: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, AllToAllContext]:
        """-> (copies grouped by local expert, tokens_per_local_expert_L, ctx)."""
        row_map_TK, counts_E = self.route(routing)
        counts = self.exchange_counts(counts_E.view(self.ep_size, -1))
        exchange = AllToAllExchange(counts.send_splits, counts.recv_splits, self.ep_group)
        num_rows = self.kept_rows(routing, counts.send_splits)
        x_recv_NH = dispatch_rows(x_TH, row_map_TK, num_rows, wire=self.dtype, exchange=exchange, backend=self.backend)
        x_recv_NH = gather_rows(x_recv_NH, counts.etp_rows, self.etp_group)
        regroup_idx_N = regroup_index(counts.counts_SL)
        ctx = AllToAllContext(
            row_map_TK,
            routing.topk_weight_TK,
            x_TH.shape[0],
            expert_splits=counts.local_splits,
            send_splits=counts.send_splits,
            recv_splits=counts.recv_splits,
            etp_rows=counts.etp_rows,
            regroup_idx_N=regroup_idx_N,
        )
        return x_recv_NH[regroup_idx_N], counts.counts_SL.sum(0), ctx

    def combine(self, y_sorted_NH: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        """Expert outputs (local-expert order) -> weighted sum per source token y_TH."""
        if not isinstance(ctx, AllToAllContext):
            raise TypeError(f"AllToAllDispatcher.combine needs an AllToAllContext, got {type(ctx).__name__}")
        y_recv_NH = y_sorted_NH[inverse_permutation(ctx.regroup_idx_N)]
        y_recv_NH = reduce_scatter_rows(y_recv_NH, ctx.etp_rows, self.etp_group)
        y_NH = self.communicate_back(y_recv_NH, ctx)
        return unpermute(y_NH, ctx.row_map_TK, ctx.probs_TK, backend=self.backend)

    def exchange_counts(self, send_counts_RL: torch.Tensor) -> CountExchange:
        """Exchange per-expert counts over EP (and gather them over ETP), then copy every split size the
        layer needs to the host at once: its one host sync."""
        recv_counts_RL = all_to_all_counts(send_counts_RL, self.ep_group)
        counts_SL = all_gather_dim(recv_counts_RL, 0, self.etp_group)  # (etp rank, ep rank) sources
        host = torch.cat([send_counts_RL.sum(1), counts_SL.flatten()]).tolist()
        send_splits, host_SL = host[: self.ep_size], host[self.ep_size :]
        num_local = counts_SL.shape[1]
        row_sums = [sum(host_SL[i * num_local : (i + 1) * num_local]) for i in range(counts_SL.shape[0])]
        etp_rank = self.etp_rank
        return CountExchange(
            counts_SL=counts_SL,
            send_splits=send_splits,
            recv_splits=row_sums[etp_rank * self.ep_size : (etp_rank + 1) * self.ep_size],
            etp_rows=[sum(row_sums[r * self.ep_size : (r + 1) * self.ep_size]) for r in range(self.etp_size)],
            local_splits=[sum(host_SL[e::num_local]) for e in range(num_local)],
        )

    def communicate_back(self, y_NH: torch.Tensor, ctx: AllToAllContext) -> torch.Tensor:
        """Reverse exchange: expert outputs back to the ranks that sent the copies, in sent order."""
        return all_to_all_rows(y_NH, ctx.recv_splits, ctx.send_splits, self.ep_group)


# ---------------------------------------------------------------------------------------------
# Applying EP to a model


def _check_sizes(layer: MoELayer, groups: ProcessGroups) -> None:
    num_experts, ffn = layer.experts.w1_EHF.shape[0], layer.experts.w1_EHF.shape[2]
    if num_experts % groups.ep_size:
        raise ValueError(f"moe.num_experts ({num_experts}) is not divisible by parallel.ep ({groups.ep_size})")
    if ffn % groups.etp_size:
        raise ValueError(f"moe.expert_ffn_hidden_size ({ffn}) is not divisible by parallel.etp ({groups.etp_size})")


def shard_experts(layer: MoELayer, prefix: str, groups: ProcessGroups) -> None:
    """Keep this rank's (ep, etp) slice of each routed-expert weight and attach its ParamMeta."""
    _check_sizes(layer, groups)
    experts = layer.experts
    for name, ffn_dim in EXPERT_WEIGHTS.items():
        full = getattr(experts, name)
        meta = get_meta(full)  # tensor parallelism may have set the unsharded expert default
        if meta is not None and meta.shards:
            raise RuntimeError(f"{meta.canonical_name} is already sharded as {meta.shards} (EP applied twice?)")
        canonical = meta.canonical_name if meta is not None else f"{prefix}experts.{name}"
        with torch.no_grad():
            local = shard_slice(full.detach(), 0, groups.ep_rank, groups.ep_size)
            local = shard_slice(local, ffn_dim, groups.etp_rank, groups.etp_size)
        param = nn.Parameter(local, requires_grad=full.requires_grad)
        set_meta(
            param,
            ParamMeta(
                canonical_name=canonical,
                canonical_shape=tuple(full.shape),
                shards=[("ep", 0), ("etp", ffn_dim)],
                grad_sum_kinds=("edp",),
                replicated_kinds=("edp",),
                is_expert=True,
            ),
        )
        setattr(experts, name, param)


def apply_expert_parallel(model: nn.Module, groups: ProcessGroups) -> None:
    """Shard routed experts over ep x etp, install the all-to-all dispatcher (ep * etp > 1) and, when
    tp > 1, the sequence-shard router statistics, on every MoELayer of `model` (in place).

    Expert parameters get metadata even when ep == etp == 1: their gradients are summed over "edp"
    (the whole stage then), which covers the tp ranks' different sequence shards.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    for name, layer in layers:
        shard_experts(layer, f"{name}." if name else "", groups)
        if groups.ep_size * groups.etp_size > 1:
            layer.dispatcher = AllToAllDispatcher(layer.dispatcher, groups)
        if groups.tp_size * groups.cp_size > 1:  # the micro-batch's tokens are split over tp x cp
            layer.stats_reducer = SequenceShardStats(groups.tp_cp if groups.cp_size > 1 else groups.tp)
    logger.info(
        "expert parallel applied to %d MoE layers: ep %d (rank %d), etp %d (rank %d), tp stats %s",
        len(layers),
        groups.ep_size,
        groups.ep_rank,
        groups.etp_size,
        groups.etp_rank,
        "on" if groups.tp_size * groups.cp_size > 1 else "off",
    )
