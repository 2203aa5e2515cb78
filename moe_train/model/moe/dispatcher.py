"""Local token dispatcher: permute token copies by expert (with capacity dropping) and combine back.

Legend: T tokens, H hidden, E experts, K top_k, A = T*K assignments, N kept assignments (token
copies sent to experts, grouped by expert id).

An expert-parallel dispatcher (all-to-all) replaces this object on the MoE layer; it keeps the
same `dispatch` / `combine` contract and reuses `permute` / `unpermute` as its local first and last steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_train.model.moe.router import Routing


@dataclass
class DispatchContext:
    """What `combine` needs to undo `dispatch`."""

    token_idx_N: torch.Tensor
    """Source token of each sorted copy."""
    weight_N: torch.Tensor
    """Combine weight of each sorted copy (fp32, with grad)."""
    num_tokens: int
    """T."""


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


class TokenDispatcher:
    """Single-device dispatcher: sort copies by expert, drop over-capacity ones, scatter-add back."""

    def __init__(self, num_experts: int, capacity_factor: float | None = None, drop_policy: str = "probs") -> None:
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy

    def dispatch(self, x_TH: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """-> (x_sorted_NH, tokens_per_expert_E after drops, ctx)."""
        return self.permute(x_TH, routing)

    def combine(self, y_sorted_NH: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        """Weighted unpermute back to y_TH."""
        return self.unpermute(y_sorted_NH, ctx)

    def permute(self, x_TH: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """Copies of x_TH grouped by (global) expert id after capacity drops -> (x_NH, counts_E, ctx)."""
        T, K = routing.topk_idx_TK.shape
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(self.capacity_factor, T, K, self.num_experts)
        expert_A = routing.topk_idx_TK.reshape(-1)
        kept_N = sort_assignments(
            expert_A, routing.topk_score_TK.reshape(-1), self.num_experts, capacity, self.drop_policy
        )
        token_idx_N = kept_N // K
        tokens_per_expert_E = torch.bincount(expert_A[kept_N], minlength=self.num_experts)
        ctx = DispatchContext(token_idx_N, routing.topk_weight_TK.reshape(-1)[kept_N], T)
        return x_TH[token_idx_N], tokens_per_expert_E, ctx

    def unpermute(self, y_sorted_NH: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        """Weighted unpermute: y_TH[t] = sum of weight * y over t's kept copies (fp32 accumulation)."""
        y_NH = y_sorted_NH.float() * ctx.weight_N.unsqueeze(-1)
        out_TH = y_NH.new_zeros(ctx.num_tokens, y_NH.shape[-1])
        return out_TH.index_add(0, ctx.token_idx_N, y_NH).to(y_sorted_NH.dtype)
