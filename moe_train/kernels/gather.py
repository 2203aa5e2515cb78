"""Row gather: out[i] = x[src_index[i]] (a forward-only gather kept for callers of `permute_rows`).

Legend: T tokens, H hidden, N permuted rows (token copies, e.g. T * top_k).
"""

from __future__ import annotations

import torch

from moe_train.kernels._ext import _C


def permute_rows_reference(x_TH: torch.Tensor, src_index_N: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch reference: out[i] = x[src_index[i]]."""
    return x_TH.index_select(0, src_index_N)


def permute_rows(x_TH: torch.Tensor, src_index_N: torch.Tensor) -> torch.Tensor:
    """Forward-only gather through the C++ CPU kernel when built, else the reference."""
    if _C is not None and x_TH.device.type == "cpu" and not x_TH.requires_grad:
        return _C.permute_rows(x_TH, src_index_N)
    return permute_rows_reference(x_TH, src_index_N)
