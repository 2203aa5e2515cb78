"""RMSNorm (Zhang & Sennrich, arXiv 1910.07467), computed in fp32.

Legend: `*` any leading dims, H the normalised (last) dimension.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, in fp32 whatever the input dtype (bf16 autocast safe)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_sH: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension; returns the input's dtype."""
        x32_sH = x_sH.float()
        rms_s1 = torch.rsqrt(x32_sH.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32_sH * rms_s1 * self.weight.float()).to(x_sH.dtype)

    def reset_parameters(self) -> None:
        """Weights to ones."""
        nn.init.ones_(self.weight)
