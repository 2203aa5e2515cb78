"""Dense SwiGLU MLP (Shazeer, arXiv 2002.05202): w2(silu(w1 x) * w3 x).

Legend: `*` any leading dims, H hidden, F ffn hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.kernels import silu_mul
from moe_train.model.recompute import checkpoint_local


def swiglu(
    x_sH: torch.Tensor, w1_FH: torch.Tensor, w3_FH: torch.Tensor, w2_HF: torch.Tensor, fuse_gate_up: bool = False
) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) with nn.Linear-layout weights (out, in); fuse_gate_up: one GEMM against
    [w1; w3] (concatenated per call, the parameters keep their shapes) instead of two. silu(.) * (.) is
    the fused kernel where one is built (moe_train.kernels.silu_mul)."""
    if fuse_gate_up:
        g_sG = F.linear(x_sH, torch.cat([w1_FH, w3_FH]))  # G = 2F: gate | up
        gate_sF, up_sF = g_sG.chunk(2, dim=-1)
        return F.linear(silu_mul(gate_sF, up_sF), w2_HF)
    return F.linear(silu_mul(F.linear(x_sH, w1_FH), F.linear(x_sH, w3_FH)), w2_HF)


class FeedForward(nn.Module):
    """SwiGLU MLP with bias-free nn.Linear w1 (gate), w3 (up), w2 (down)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)
        self.recompute = False
        """train.recompute 'selective': keep x, recompute the [*, F] intermediates in backward."""
        self.fuse_gate_up = False
        """One GEMM against [w1; w3] instead of two (see `swiglu`)."""

    def forward(self, x_sH: torch.Tensor) -> torch.Tensor:
        """x_sH -> y_sH."""
        args = (x_sH, self.w1.weight, self.w3.weight, self.w2.weight, self.fuse_gate_up)
        return checkpoint_local(swiglu, *args) if self.recompute else swiglu(*args)
