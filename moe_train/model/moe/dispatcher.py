"""Local token dispatcher: permute token copies by expert (with capacity dropping) and combine back.

Legend: T tokens, H hidden, E experts, K top_k, A = T*K assignments, N kept assignments (token
copies sent to experts, grouped by expert id).

The permute and the weighted combine are the ops of `moe_train.kernels` (C++/CUDA kernels when built,
the pure-PyTorch reference otherwise; moe.dispatch.backend). Capacity dropping sits on top of them: the
assignments over capacity get expert id -1 before the permute, which skips them. moe.dispatch.dtype
sets the dtype of the dispatched rows (fp32, bf16, or FP8 with block scales); on one device the rows
go through the same cast or quantisation as on the EP wire, so both give the same numbers.

An expert-parallel dispatcher (all-to-all) replaces this object on the MoE layer; it keeps the
same `dispatch` / `combine` contract and reuses `route` and the kernels' ops around its exchange.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_train.config import ConfigError, MoEConfig
from moe_train.kernels import WIRE_DTYPES, build_row_map, check_backend, dispatch_rows, unpermute
from moe_train.model.moe.router import Routing


@dataclass
class DispatchContext:
    """What `combine` needs to undo `dispatch`."""

    row_map_TK: torch.Tensor
    """Row of each (token, choice) among the dispatched rows; -1 when dropped by capacity."""
    probs_TK: torch.Tensor
    """Combine weight of each (token, choice) (fp32, with grad); dropped ones get no gradient."""
    num_tokens: int
    """T."""
    expert_splits: list[int] | None
    """Host copy of the dispatched rows per (local) expert, made by the dispatcher when it needs the counts
    on the host anyway (capacity drops, the EP all-to-all's split sizes): the layer's one device-to-host
    copy, reused by the experts. None when the dispatcher made none (dropless on one device)."""


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """ceil(capacity_factor * T * k / E)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def sort_assignments(
    expert_A: torch.Tensor, score_A: torch.Tensor, num_experts: int, capacity: int | None, drop_policy: str
) -> torch.Tensor:
    """Indices of the kept assignments, grouped by expert id (ascending).

    Within an expert, copies are ordered by priority: descending score ('probs') or token order
    ('position'); with a capacity, only the first `capacity` of each expert are kept.
    """
    if capacity is None or drop_policy == "position":
        order_A = torch.arange(expert_A.numel(), device=expert_A.device)
    elif drop_policy == "probs":
        order_A = torch.sort(score_A, descending=True, stable=True).indices
    else:
        raise ValueError(f"drop_policy ({drop_policy!r}) must be 'probs' or 'position'")
    order_A = order_A[torch.sort(expert_A[order_A], stable=True).indices]
    if capacity is None:
        return order_A
    counts_E = torch.bincount(expert_A, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_A = torch.arange(order_A.numel(), device=order_A.device) - starts_E[expert_A[order_A]]
    return order_A[rank_A < capacity]


def drop_over_capacity(
    topk_idx_TK: torch.Tensor, topk_score_TK: torch.Tensor, num_experts: int, capacity: int, drop_policy: str
) -> torch.Tensor:
    """topk_idx_TK with the assignments that do not fit an expert's capacity replaced by -1."""
    kept_N = sort_assignments(topk_idx_TK.reshape(-1), topk_score_TK.reshape(-1), num_experts, capacity, drop_policy)
    keep_A = torch.zeros(topk_idx_TK.numel(), dtype=torch.bool, device=topk_idx_TK.device)
    keep_A[kept_N] = True
    return topk_idx_TK.masked_fill(~keep_A.view(topk_idx_TK.shape), -1)


class TokenDispatcher:
    """Single-device dispatcher: sort copies by expert, drop over-capacity ones, weighted-sum them back."""

    def __init__(
        self,
        num_experts: int,
        capacity_factor: float | None = None,
        drop_policy: str = "probs",
        *,
        dtype: str = "fp32",
        backend: str = "auto",
    ) -> None:
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"dispatch dtype {dtype!r} must be one of {', '.join(WIRE_DTYPES)}")
        check_backend(backend)
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.dtype = dtype
        self.backend = backend

    @classmethod
    def from_config(cls, moe_cfg: MoEConfig) -> TokenDispatcher:
        """The dispatcher moe_cfg describes; ConfigError when moe.dispatch.backend's extension is not built."""
        try:
            check_backend(moe_cfg.dispatch.backend)
        except ValueError as err:
            raise ConfigError(f"moe.dispatch.backend: {err}") from None
        return cls(
            moe_cfg.num_experts,
            moe_cfg.capacity_factor,
            moe_cfg.drop_policy,
            dtype=moe_cfg.dispatch.dtype,
            backend=moe_cfg.dispatch.backend,
        )

    def route(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Capacity drops + row map -> (row_map_TK, tokens_per_expert_E after drops); no host sync."""
        topk_idx_TK = routing.topk_idx_TK
        if self.capacity_factor is not None:
            T, K = topk_idx_TK.shape
            capacity = expert_capacity(self.capacity_factor, T, K, self.num_experts)
            topk_idx_TK = drop_over_capacity(
                topk_idx_TK, routing.topk_score_TK, self.num_experts, capacity, self.drop_policy
            )
        return build_row_map(topk_idx_TK, self.num_experts, backend=self.backend)

    def kept_rows(self, routing: Routing, counts: list[int]) -> int:
        """Rows that `route` keeps: T*K when dropless, else the sum of the (host) counts."""
        return routing.topk_idx_TK.numel() if self.capacity_factor is None else sum(counts)

    def dispatch(self, x_TH: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """-> (x_sorted_NH, tokens_per_expert_E after drops, ctx)."""
        row_map_TK, tokens_per_expert_E = self.route(routing)
        splits = None  # dropless: T*K rows, known without a host sync; the experts may not need one either
        if self.capacity_factor is not None:
            splits = tokens_per_expert_E.tolist()  # the layer's one host sync: the kept rows
        num_rows = self.kept_rows(routing, splits or [])
        x_NH = dispatch_rows(x_TH, row_map_TK, num_rows, wire=self.dtype, backend=self.backend)
        ctx = DispatchContext(row_map_TK, routing.topk_weight_TK, x_TH.shape[0], expert_splits=splits)
        return x_NH, tokens_per_expert_E, ctx

    def combine(self, y_sorted_NH: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        """Weighted unpermute back to y_TH (fp32 accumulation, in y's dtype)."""
        return unpermute(y_sorted_NH, ctx.row_map_TK, ctx.probs_TK, backend=self.backend)
