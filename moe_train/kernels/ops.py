"""Dispatch kernels without autograd: each call goes to the extension that `backend` and the tensors'
device select (moe_train.kernels._ext.kernel_module), else to the pure-PyTorch reference.

Legend: T tokens, H hidden, K choices per token, E experts, R rows, G = ceil(H / 128) scale blocks.
"""

from __future__ import annotations

import torch

from moe_train.kernels import reference
from moe_train.kernels._ext import kernel_module
from moe_train.kernels.fp8 import FP8_DTYPE, dequantize_reference


def build_row_map(topk_idx_TK: torch.Tensor, num_experts: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (row_map_TK, tokens_per_expert_E); expert ids in [-1, E), -1 = dropped."""
    module = kernel_module(backend, topk_idx_TK.device)
    if module is None:
        return reference.build_row_map_reference(topk_idx_TK, num_experts)
    row_map_TK, counts_E = module.build_row_map(topk_idx_TK.long(), num_experts)
    return row_map_TK, counts_E


def permute_rows(
    x_TH: torch.Tensor, row_map_TK: torch.Tensor, num_rows: int, probs_TK: torch.Tensor | None, backend: str
) -> torch.Tensor:
    """rows_RH[row_map[t, k]] = x[t] (scaled by probs[t, k] when given)."""
    probs = None if probs_TK is None else probs_TK.float()
    module = kernel_module(backend, x_TH.device, x_TH.dtype)
    if module is None:
        return reference.permute_reference(x_TH, row_map_TK, num_rows, probs)
    out: torch.Tensor = module.permute(x_TH, row_map_TK, num_rows, probs)
    return out


def permute_fp8(
    x_TH: torch.Tensor, row_map_TK: torch.Tensor, num_rows: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The permute fused with FP8 quantisation -> (rows_RH float8_e4m3fn, scales_RG fp32)."""
    module = kernel_module(backend, x_TH.device, x_TH.dtype)
    if module is None:
        return reference.permute_fp8_reference(x_TH, row_map_TK, num_rows)
    rows_RH, scales_RG = module.permute_fp8(x_TH, row_map_TK, num_rows)
    return rows_RH, scales_RG


def unpermute_rows(
    rows_RH: torch.Tensor, row_map_TK: torch.Tensor, probs_TK: torch.Tensor | None, backend: str
) -> torch.Tensor:
    """out_TH[t] = sum_k probs[t, k] * rows[row_map[t, k]] (fp32 accumulation), in rows' dtype."""
    probs = None if probs_TK is None else probs_TK.float()
    module = kernel_module(backend, rows_RH.device, rows_RH.dtype)
    if module is None:
        return reference.unpermute_reference(rows_RH, row_map_TK, probs)
    out: torch.Tensor = module.unpermute(rows_RH, row_map_TK, probs)
    return out


def unpermute_backward(
    grad_TH: torch.Tensor, rows_RH: torch.Tensor, row_map_TK: torch.Tensor, probs_TK: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the weighted unpermute -> (grad_rows_RH, grad_probs_TK fp32)."""
    grad = grad_TH.to(rows_RH.dtype)
    module = kernel_module(backend, rows_RH.device, rows_RH.dtype)
    if module is None:
        return reference.unpermute_backward_reference(grad, rows_RH, row_map_TK, probs_TK.float())
    grad_rows_RH, grad_probs_TK = module.unpermute_backward(grad, rows_RH, row_map_TK, probs_TK.float())
    return grad_rows_RH, grad_probs_TK


def dequantize(rows_RH: torch.Tensor, scales_RG: torch.Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """FP8 rows (float8_e4m3fn or their uint8 bytes) times their block scales, as dtype."""
    q_RH = rows_RH.view(FP8_DTYPE) if rows_RH.dtype == torch.uint8 else rows_RH
    module = kernel_module(backend, q_RH.device, dtype)
    if module is None:
        return dequantize_reference(q_RH, scales_RG, dtype)
    out: torch.Tensor = module.dequantize(q_RH, scales_RG, dtype)
    return out
