"""Grouped-query causal self-attention with RoPE and optional qk-norm (per head, or over the full projection).

Legend: B batch, S sequence, H hidden, N query heads, G key/value heads, D head_dim, R = D/2.
Head counts are read from tensor shapes (`.view(B, S, -1, D)`), never from the config, so
column-sharded (tensor-parallel) wq/wk/wv work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.model.norms import RMSNorm
from moe_train.model.recompute import checkpoint_local
from moe_train.model.rope import apply_rope

try:  # optional fast path; never required
    from flash_attn import flash_attn_func  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_func = None


def causal_attention(q_BSND: torch.Tensor, k_BSGD: torch.Tensor, v_BSGD: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention -> out_BSND; flash-attn for CUDA fp16/bf16 when installed, else SDPA."""
    if flash_attn_func is not None and q_BSND.is_cuda and q_BSND.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q_BSND, k_BSGD, v_BSGD, causal=True)
    q_BNSD, k_BGSD, v_BGSD = (t.transpose(1, 2) for t in (q_BSND, k_BSGD, v_BSGD))
    gqa = q_BNSD.shape[1] != k_BGSD.shape[1]
    out_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BGSD, v_BGSD, is_causal=True, enable_gqa=gqa)
    return out_BNSD.transpose(1, 2)


class Attention(nn.Module):
    """wq/wk/wv (no bias) -> [qk-norm] -> RoPE -> causal GQA -> wo.

    qk-norm scope 'head' (Qwen3) normalises each head over head_dim with one head_dim-wide weight;
    'full' (OLMoE) normalises the whole q (N*D) and k (G*D) projections, each with its own weight.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        qk_norm_scope: str = "head",
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.wq = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        if qk_norm_scope not in ("head", "full"):
            raise ValueError(f"qk_norm_scope ({qk_norm_scope!r}) must be 'head' or 'full'")
        self.qk_norm_full = qk_norm_scope == "full"
        q_width, k_width = (
            (num_heads * head_dim, num_kv_heads * head_dim) if self.qk_norm_full else (head_dim, head_dim)
        )
        self.q_norm = RMSNorm(q_width, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(k_width, norm_eps) if qk_norm else None
        self.core_attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = causal_attention
        """(q_BSND, k_BSGD, v_BSGD) -> out_BSND after RoPE; context parallelism swaps in its K/V exchange."""
        self.recompute = False
        """train.recompute 'selective': recompute the attention core in backward."""
        self.fuse_qkv = False
        """One GEMM against [wq; wk; wv] instead of three (see `_project`)."""

    def forward(self, x_BSH: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
        """Self-attention over the sequence; returns out_BSH."""
        B, S, _ = x_BSH.shape
        q_BSX, k_BSX, v_BSX = self._project(x_BSH)  # X: the projection width (N*D or G*D)
        if self.qk_norm_full and self.q_norm is not None and self.k_norm is not None:
            q_BSX, k_BSX = self.q_norm(q_BSX), self.k_norm(k_BSX)
        q_BSND = q_BSX.reshape(B, S, -1, self.head_dim)
        k_BSGD = k_BSX.reshape(B, S, -1, self.head_dim)
        v_BSGD = v_BSX.reshape(B, S, -1, self.head_dim)
        if not self.qk_norm_full and self.q_norm is not None and self.k_norm is not None:
            q_BSND, k_BSGD = self.q_norm(q_BSND), self.k_norm(k_BSGD)
        q_BSND = apply_rope(q_BSND, cos_SR, sin_SR)
        k_BSGD = apply_rope(k_BSGD, cos_SR, sin_SR)
        if self.recompute:
            out_BSND = checkpoint_local(self.core_attention, q_BSND, k_BSGD, v_BSGD)
        else:
            out_BSND = self.core_attention(q_BSND, k_BSGD, v_BSGD)
        return self.wo(out_BSND.reshape(B, S, -1))

    def _project(self, x_BSH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections; fuse_qkv: one GEMM against [wq; wk; wv] concatenated per call."""
        if not self.fuse_qkv:
            return self.wq(x_BSH), self.wk(x_BSH), self.wv(x_BSH)
        widths = [self.wq.weight.shape[0], self.wk.weight.shape[0], self.wv.weight.shape[0]]
        qkv_BSX = F.linear(x_BSH, torch.cat([self.wq.weight, self.wk.weight, self.wv.weight]))
        q_BSX, k_BSX, v_BSX = qkv_BSX.split(widths, dim=-1)
        return q_BSX, k_BSX, v_BSX
