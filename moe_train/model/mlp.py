"""Dense SwiGLU MLP (Shazeer, arXiv 2002.05202): w2(silu(w1 x) * w3 x).

Legend: `*` any leading dims, H hidden, F ffn hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """SwiGLU MLP with bias-free nn.Linear w1 (gate), w3 (up), w2 (down)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x_sH: torch.Tensor) -> torch.Tensor:
        """x_sH -> y_sH."""
        return self.w2(F.silu(self.w1(x_sH)) * self.w3(x_sH))
