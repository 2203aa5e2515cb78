"""Rotary position embedding (RoFormer, arXiv 2104.09864), rotate-half (Llama / HF) layout.

Legend: B batch, S sequence, N heads, D head_dim, R = D/2 rotation pairs.
Pair r of a head is (x[..., r], x[..., r + R]), rotated by angle pos * theta^(-2r/D).
"""

from __future__ import annotations

import torch
from torch import nn


def rope_angles(seq_len: int, head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Angles_SR[s, r] = s * theta^(-2r/D), in fp32."""
    inv_freq_R = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos_S = torch.arange(seq_len, device=device, dtype=torch.float32)
    return torch.outer(pos_S, inv_freq_R)


def apply_rope(x_BSND: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_r, x_{r+R}) pair of every head by its position's angle (fp32 math, input dtype out)."""
    seq_len, half = x_BSND.shape[1], x_BSND.shape[-1] // 2
    cos_1S1R = cos_SR[:seq_len].view(1, seq_len, 1, half)
    sin_1S1R = sin_SR[:seq_len].view(1, seq_len, 1, half)
    x1_BSNR, x2_BSNR = x_BSND.float().split(half, dim=-1)
    out_BSND = torch.cat([x1_BSNR * cos_1S1R - x2_BSNR * sin_1S1R, x2_BSNR * cos_1S1R + x1_BSNR * sin_1S1R], -1)
    return out_BSND.to(x_BSND.dtype)


class RotaryEmbedding(nn.Module):
    """Holds cos/sin tables (non-persistent buffers), grown lazily to the longest sequence seen."""

    cos_SR: torch.Tensor
    sin_SR: torch.Tensor

    def __init__(self, head_dim: int, theta: float, max_seq_len: int = 0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("cos_SR", torch.empty(0, head_dim // 2), persistent=False)
        self.register_buffer("sin_SR", torch.empty(0, head_dim // 2), persistent=False)
        if max_seq_len > 0:
            self.reset(max_seq_len)

    def reset(self, seq_len: int | None = None) -> None:
        """(Re)compute the tables, e.g. after `to_empty()` from the meta device."""
        seq_len = self.cos_SR.shape[0] if seq_len is None else seq_len
        angles_SR = rope_angles(seq_len, self.head_dim, self.theta, device=self.cos_SR.device)
        self.cos_SR = angles_SR.cos()
        self.sin_SR = angles_SR.sin()

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos_SR, sin_SR) covering at least `seq_len` positions on `device`."""
        if self.cos_SR.shape[0] < seq_len or self.cos_SR.device != device:
            self.cos_SR = self.cos_SR.to(device)
            self.reset(max(seq_len, self.cos_SR.shape[0]))
        return self.cos_SR, self.sin_SR
