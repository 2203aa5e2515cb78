"""Token dispatch ops: permute (grouping token copies by expert, optionally fused with FP8 quantisation),
unpermute (the weighted combine), dequantize, and their autograd.

* `permute(tokens_TH, topk_idx_TK, num_experts, fp8=...)` -> `Permuted(rows, tokens_per_expert, row_map,
  scales)`: rows grouped by expert, stable within an expert (Megatron-Core's moe_utils.permute order);
  expert id -1 marks an assignment dropped by capacity (row_map -1). Differentiable in the tokens unless
  fp8: the backward is the (unweighted) combine of the gradient.
* `unpermute(rows_RH, row_map_TK, probs_TK)` -> [T, H]: sum_k probs * row in fp32, in rows' dtype;
  backward = the dispatch of the gradient scaled by probs, plus the probs' gradient.
* `dispatch_rows(...)`: the training path. Permute -> optional wire cast (bf16) or FP8 quantisation ->
  an optional exchange (the EP all-to-all) -> back to the activation dtype. Straight-through: the
  backward sends the gradient back in its own dtype and combines it, never in FP8.

Legend: T tokens, H hidden, K choices per token, E experts, R rows, N received rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch

from moe_train.kernels import ops
from moe_train.kernels.fp8 import FP8_DTYPE

WIRE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": FP8_DTYPE}
"""moe.dispatch.dtype -> the dtype of the dispatched rows on the wire."""


class Permuted(NamedTuple):
    """Result of `permute`."""

    rows: torch.Tensor
    """[R, H] token copies grouped by expert (float8_e4m3fn with fp8=True, else the tokens' dtype)."""
    tokens_per_expert: torch.Tensor
    """[E] int64 rows per expert."""
    row_map: torch.Tensor
    """[T, K] int64 row of each (token, choice), -1 when dropped: what `unpermute` needs."""
    scales: torch.Tensor | None
    """[R, ceil(H / 128)] fp32 block scales with fp8=True, else None."""


class RowExchange(Protocol):
    """Moves dispatched rows between ranks (e.g. the EP all-to-all): row counts change, row content not."""

    def send(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Forward exchange of row-aligned tensors ([R, ...] each -> [N, ...] each)."""
        ...

    def send_back(self, grad_NH: torch.Tensor) -> torch.Tensor:
        """Reverse exchange of the received rows' gradient ([N, H] -> [R, H])."""
        ...


def num_kept_rows(topk_idx_TK: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> int:
    """R: T*K when nothing is dropped (known without a device sync), else the sum of the counts."""
    if not bool((topk_idx_TK < 0).any()):
        return topk_idx_TK.numel()
    return int(tokens_per_expert_E.sum())


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_TH: torch.Tensor, row_map_TK: torch.Tensor, num_rows: int, backend: str) -> Any:
        ctx.save_for_backward(row_map_TK)
        ctx.backend = backend
        return ops.permute_rows(x_TH, row_map_TK, num_rows, None, backend)

    @staticmethod
    def backward(ctx: Any, grad_RH: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (row_map_TK,) = ctx.saved_tensors
        return ops.unpermute_rows(grad_RH.contiguous(), row_map_TK, None, ctx.backend), None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, rows_RH: torch.Tensor, row_map_TK: torch.Tensor, probs_TK: torch.Tensor | None, backend: str
    ) -> Any:
        ctx.save_for_backward(rows_RH, row_map_TK, probs_TK)
        ctx.backend = backend
        return ops.unpermute_rows(rows_RH, row_map_TK, probs_TK, backend)

    @staticmethod
    def backward(ctx: Any, grad_TH: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        rows_RH, row_map_TK, probs_TK = ctx.saved_tensors
        grad_TH = grad_TH.contiguous()
        if probs_TK is None:
            return ops.permute_rows(grad_TH, row_map_TK, rows_RH.shape[0], None, ctx.backend), None, None, None
        grad_rows, grad_probs = ops.unpermute_backward(grad_TH, rows_RH, row_map_TK, probs_TK, ctx.backend)
        return grad_rows, None, grad_probs.to(probs_TK.dtype), None


def build_row_map(
    topk_idx_TK: torch.Tensor, num_experts: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The index half of `permute`: (row_map_TK, tokens_per_expert_E) of a routing (-1 = dropped)."""
    return ops.build_row_map(topk_idx_TK, num_experts, backend)


def permute(
    tokens_TH: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int, *, fp8: bool = False, backend: str = "auto"
) -> Permuted:
    """Copies of the tokens grouped by expert (stable), optionally quantised to FP8 E4M3 with block scales."""
    row_map_TK, counts_E = ops.build_row_map(topk_idx_TK, num_experts, backend)
    num_rows = num_kept_rows(topk_idx_TK, counts_E)
    if fp8:
        rows_RH, scales_RG = ops.permute_fp8(tokens_TH, row_map_TK, num_rows, backend)
        return Permuted(rows_RH, counts_E, row_map_TK, scales_RG)
    rows_RH = _Permute.apply(tokens_TH, row_map_TK, num_rows, backend)
    return Permuted(rows_RH, counts_E, row_map_TK, None)


def unpermute(
    rows_RH: torch.Tensor, row_map_TK: torch.Tensor, probs_TK: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """out_TH[t] = sum_k probs[t, k] * rows[row_map[t, k]] (1 without probs), fp32 accumulation, rows' dtype."""
    probs = None if probs_TK is None else probs_TK.float()
    out: torch.Tensor = _Unpermute.apply(rows_RH, row_map_TK, probs, backend)
    return out


def dequantize(
    rows_RH: torch.Tensor, scales_RG: torch.Tensor, dtype: torch.dtype, *, backend: str = "auto"
) -> torch.Tensor:
    """FP8 rows times the scale of their 128-channel block, as dtype (not differentiable)."""
    return ops.dequantize(rows_RH, scales_RG, dtype, backend)


def _send_rows(
    x_TH: torch.Tensor, row_map_TK: torch.Tensor, num_rows: int, wire: str, exchange: RowExchange | None, backend: str
) -> torch.Tensor:
    """Permute x, put the rows on the wire in `wire` dtype, exchange, and return them in x's dtype."""
    send = (lambda ts: list(ts)) if exchange is None else exchange.send
    if wire == "fp8":
        q_RH, scales_RG = ops.permute_fp8(x_TH, row_map_TK, num_rows, backend)
        q_NH, scales_NG = send([q_RH.view(torch.uint8), scales_RG.view(torch.uint8)])  # gloo has no float8
        return ops.dequantize(q_NH.view(FP8_DTYPE), scales_NG.view(torch.float32), x_TH.dtype, backend)
    rows_RH = ops.permute_rows(x_TH.to(WIRE_DTYPES[wire]), row_map_TK, num_rows, None, backend)
    (rows_NH,) = send([rows_RH])
    return rows_NH.to(x_TH.dtype)


class _DispatchRows(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x_TH: torch.Tensor,
        row_map_TK: torch.Tensor,
        num_rows: int,
        wire: str,
        exchange: RowExchange | None,
        backend: str,
    ) -> Any:
        ctx.save_for_backward(row_map_TK)
        ctx.exchange, ctx.backend = exchange, backend
        return _send_rows(x_TH, row_map_TK, num_rows, wire, exchange, backend)

    @staticmethod
    def backward(ctx: Any, grad_NH: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None, None]:
        (row_map_TK,) = ctx.saved_tensors
        grad_RH = grad_NH.contiguous() if ctx.exchange is None else ctx.exchange.send_back(grad_NH.contiguous())
        return ops.unpermute_rows(grad_RH, row_map_TK, None, ctx.backend), None, None, None, None, None


def dispatch_rows(
    x_TH: torch.Tensor,
    row_map_TK: torch.Tensor,
    num_rows: int,
    *,
    wire: str = "fp32",
    exchange: RowExchange | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Differentiable dispatch of x's token copies by `row_map`, through the wire dtype and `exchange`.

    Returns the (received) rows in x's dtype. The backward is straight-through for the wire cast or
    quantisation: the gradient goes back through `exchange.send_back` in its own dtype and is combined
    (summed per token) into x's gradient.
    """
    if wire not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {wire!r} must be one of {', '.join(WIRE_DTYPES)}")
    out: torch.Tensor = _DispatchRows.apply(x_TH, row_map_TK, num_rows, wire, exchange, backend)
    return out
