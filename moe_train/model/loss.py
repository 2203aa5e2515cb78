"""Chunked output projection + cross entropy (`train.loss_chunk_tokens`): the per-token loss of
h @ W^T without ever holding the [tokens, vocab] logits, forward or backward.

Legend: N tokens (B*S flattened), H hidden, V vocabulary (v: this rank's vocab shard), C tokens of a chunk.

Forward, per chunk of C tokens: logits_CV = h_C @ W^T in fp32, the row's log-sum-exp and target logit,
loss = lse - target; only lse_N (one float per token) is kept besides h, W and the labels. Backward
recomputes each chunk's logits: d loss / d logits = softmax - onehot = exp(logits - lse) - onehot, then
grad_h_C = g_CV @ W and grad_W += g_CV^T @ h_C. Peak extra memory is a few [C, V] fp32 buffers instead
of [N, V] logits plus their log-softmax and gradient (the recompute costs one more h @ W^T GEMM).
The same idea as Liger-Kernel's fused linear cross entropy and Apple's Cut Cross-Entropy
(arXiv 2411.09009), written here for CPU and CUDA alike in plain torch ops.

Vocab-parallel variant: with the head's rows split over tensor-parallel ranks (entries
[vocab_start, vocab_start + v) on this rank), the per-chunk max, sum of exponentials and target logit
are reduced over the group (`VocabReduce`); the backward needs no communication, and grad_h is this
rank's partial sum (the sequence gather in front of the head sums it over ranks in its backward).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

IGNORE_INDEX = -100
"""Label value whose token loss is 0 (cross-entropy's ignore_index)."""


class VocabReduce(Protocol):
    """Reductions over the ranks that hold the vocabulary shards (in place allowed; returns the result)."""

    def max(self, x: torch.Tensor) -> torch.Tensor: ...

    def sum(self, x: torch.Tensor) -> torch.Tensor: ...


class _Local:
    """The whole vocabulary on this rank: nothing to reduce."""

    def max(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The GEMM dtype: autocast's when it is on for h's device, else h's own."""
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return h.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h_NH: torch.Tensor,
        weight_vH: torch.Tensor,
        labels_N: torch.Tensor,
        chunk: int,
        vocab_start: int,
        reduce: VocabReduce,
    ) -> torch.Tensor:
        dtype = _compute_dtype(h_NH)
        with torch.autocast(h_NH.device.type, enabled=False):
            w_vH = weight_vH.to(dtype)
            loss_N = torch.empty(h_NH.shape[0], dtype=torch.float32, device=h_NH.device)
            lse_N = torch.empty_like(loss_N)
            for start in range(0, h_NH.shape[0], chunk):
                rows = slice(start, start + chunk)
                logits_Cv = (h_NH[rows].to(dtype) @ w_vH.t()).float()
                max_C = reduce.max(logits_Cv.max(dim=-1).values)
                sum_exp_C = reduce.sum((logits_Cv - max_C.unsqueeze(-1)).exp_().sum(dim=-1))
                lse_N[rows] = max_C + sum_exp_C.log()
                index_C1, owned_C = _local_labels(labels_N[rows], vocab_start, logits_Cv.shape[-1])
                target_C = reduce.sum(logits_Cv.gather(-1, index_C1).squeeze(-1).masked_fill(~owned_C, 0.0))
                loss_N[rows] = lse_N[rows] - target_C
        loss_N.masked_fill_(labels_N == IGNORE_INDEX, 0.0)
        ctx.save_for_backward(h_NH, weight_vH, labels_N, lse_N)
        ctx.chunk, ctx.vocab_start, ctx.dtype = chunk, vocab_start, dtype
        return loss_N

    @staticmethod
    def backward(ctx: Any, grad_loss_N: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h_NH, weight_vH, labels_N, lse_N = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        scale_N = grad_loss_N.float().masked_fill(labels_N == IGNORE_INDEX, 0.0)
        w_vH = weight_vH.to(dtype)
        grad_h_NH = torch.empty_like(h_NH)
        grad_w_vH = torch.zeros(weight_vH.shape, dtype=torch.float32, device=weight_vH.device)
        with torch.autocast(h_NH.device.type, enabled=False):
            for start in range(0, h_NH.shape[0], chunk):
                rows = slice(start, start + chunk)
                h_CH = h_NH[rows].to(dtype)
                logits_Cv = (h_CH @ w_vH.t()).float()
                g_Cv = logits_Cv.sub_(lse_N[rows].unsqueeze(-1)).exp_()  # softmax
                index_C1, owned_C = _local_labels(labels_N[rows], ctx.vocab_start, g_Cv.shape[-1])
                g_Cv.scatter_add_(-1, index_C1, -owned_C.to(g_Cv.dtype).unsqueeze(-1))
                g_Cv.mul_(scale_N[rows].unsqueeze(-1))
                g_Cv = g_Cv.to(dtype)
                grad_h_NH[rows] = (g_Cv @ w_vH).to(h_NH.dtype)
                grad_w_vH.addmm_(g_Cv.t().float(), h_CH.float())
        return grad_h_NH, grad_w_vH.to(weight_vH.dtype), None, None, None, None


def _local_labels(labels_C: torch.Tensor, vocab_start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into this shard's columns, clamped; whether this shard owns the label)."""
    local_C = labels_C - vocab_start
    owned_C = (local_C >= 0) & (local_C < width)
    return local_C.clamp(0, width - 1).unsqueeze(-1), owned_C


def chunked_linear_cross_entropy(
    h_BSH: torch.Tensor,
    weight_vH: torch.Tensor,
    labels_BS: torch.Tensor,
    chunk_tokens: int,
    vocab_start: int = 0,
    reduce: VocabReduce | None = None,
) -> torch.Tensor:
    """Per-token fp32 cross entropy of h @ weight^T -> loss_BS, `chunk_tokens` tokens at a time
    (0 where labels == IGNORE_INDEX). With `reduce`, weight holds vocab entries [vocab_start, +v) and
    the reductions run over the shards' group (every rank gets the full loss)."""
    if chunk_tokens <= 0:
        raise ValueError(f"train.loss_chunk_tokens ({chunk_tokens}) must be > 0 for the chunked loss")
    loss_N = _ChunkedLinearCrossEntropy.apply(
        h_BSH.flatten(0, 1), weight_vH, labels_BS.flatten(), chunk_tokens, vocab_start, reduce or _Local()
    )
    return loss_N.view(labels_BS.shape)
