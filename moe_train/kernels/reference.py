"""Pure-PyTorch references of the dispatch kernels (csrc/cpu, csrc/cuda): the spec they are tested against,
and the 'torch' backend.

A routing topk_idx_TK holds expert ids in [0, E), or -1 for an assignment dropped by capacity. The permute
puts the kept assignments into R rows grouped by expert, in assignment order within an expert (the order
of Megatron-Core's moe_utils.permute); row_map_TK[t, k] is the row of assignment (t, k), -1 when dropped.
The unpermute sums each token's rows in ascending row order in fp32 (Megatron-Core's scatter_add order).

Legend: T tokens, H hidden, K choices per token, E experts, A = T*K assignments, R rows.
"""

from __future__ import annotations

import torch

from moe_train.kernels.fp8 import quantize_fp8_reference


def build_row_map_reference(topk_idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (row_map_TK int64, tokens_per_expert_E int64)."""
    expert_A = topk_idx_TK.reshape(-1)
    bad_A = (expert_A < -1) | (expert_A >= num_experts)
    if bool(bad_A.any()):
        raise ValueError(f"expert id {int(expert_A[bad_A][0])} out of range [-1, {num_experts})")
    kept_A = expert_A >= 0
    counts_E = torch.bincount(expert_A[kept_A], minlength=num_experts)
    order_A = torch.sort(torch.where(kept_A, expert_A, num_experts), stable=True).indices
    num_rows = int(kept_A.sum())
    row_A = torch.full_like(expert_A, -1)
    row_A[order_A[:num_rows]] = torch.arange(num_rows, device=expert_A.device)
    return row_A.view(topk_idx_TK.shape), counts_E


def _kept(row_map_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat assignment ids of the kept assignments, their rows, their tokens)."""
    K = row_map_TK.shape[1]
    row_A = row_map_TK.reshape(-1)
    assign_N = torch.nonzero(row_A >= 0).flatten()
    return assign_N, row_A[assign_N], torch.div(assign_N, K, rounding_mode="floor")


def permute_reference(
    x_TH: torch.Tensor, row_map_TK: torch.Tensor, num_rows: int, probs_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """rows_RH[row_map[t, k]] = x[t] (times probs[t, k] in fp32 when given, then cast to x's dtype)."""
    assign_N, row_N, token_N = _kept(row_map_TK)
    src_R = torch.empty(num_rows, dtype=torch.long, device=x_TH.device)
    src_R[row_N] = token_N
    rows_RH = x_TH.index_select(0, src_R)
    if probs_TK is None:
        return rows_RH
    p_R = torch.empty(num_rows, dtype=torch.float32, device=x_TH.device)
    p_R[row_N] = probs_TK.reshape(-1)[assign_N].float()
    return (rows_RH.float() * p_R.unsqueeze(-1)).to(x_TH.dtype)


def permute_fp8_reference(
    x_TH: torch.Tensor, row_map_TK: torch.Tensor, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The permute of x quantised to FP8 (rows float8_e4m3fn, scales fp32 [R, ceil(H / 128)])."""
    return quantize_fp8_reference(permute_reference(x_TH, row_map_TK, num_rows))


def unpermute_reference(
    rows_RH: torch.Tensor, row_map_TK: torch.Tensor, probs_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """out_TH[t] = sum over kept k of probs[t, k] * rows[row_map[t, k]] (fp32, ascending rows), in rows' dtype."""
    T, H = row_map_TK.shape[0], rows_RH.shape[1]
    assign_N, row_N, token_N = _kept(row_map_TK)
    order_N = torch.argsort(row_N)
    contrib_NH = rows_RH.index_select(0, row_N[order_N]).float()
    if probs_TK is not None:
        contrib_NH = contrib_NH * probs_TK.reshape(-1)[assign_N[order_N]].float().unsqueeze(-1)
    out_TH = torch.zeros(T, H, dtype=torch.float32, device=rows_RH.device)
    return out_TH.index_add_(0, token_N[order_N], contrib_NH).to(rows_RH.dtype)


def unpermute_backward_reference(
    grad_TH: torch.Tensor, rows_RH: torch.Tensor, row_map_TK: torch.Tensor, probs_TK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the weighted unpermute: (grad_rows_RH in rows' dtype, grad_probs_TK fp32)."""
    assign_N, row_N, token_N = _kept(row_map_TK)
    grad_rows_RH = permute_reference(grad_TH.to(rows_RH.dtype), row_map_TK, rows_RH.shape[0], probs_TK)
    dot_N = (grad_TH.float().index_select(0, token_N) * rows_RH.float().index_select(0, row_N)).sum(-1)
    grad_probs_A = torch.zeros(row_map_TK.numel(), dtype=torch.float32, device=rows_RH.device)
    grad_probs_A[assign_N] = dot_N
    return grad_rows_RH, grad_probs_A.view(row_map_TK.shape)
