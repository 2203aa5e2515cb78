"""Routed experts as grouped SwiGLU weights.

Legend: E local experts, H hidden, F expert ffn hidden, N token copies sorted by expert,
M copies of one expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as w1_EHF (gate), w3_EHF (up), w2_EFH (down).

    The expert count is read from the parameter shape, so an expert-parallel shard holding a
    slice of the experts works unchanged.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.w1_EHF = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w3_EHF = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w2_EFH = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """normal(0, std) for w1/w3 and normal(0, out_std or std) for w2."""
        nn.init.normal_(self.w1_EHF, std=std)
        nn.init.normal_(self.w3_EHF, std=std)
        nn.init.normal_(self.w2_EFH, std=std if out_std is None else out_std)

    def forward(self, x_sorted_NH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """One matmul chain per expert over its contiguous slice of copies; returns y_sorted_NH."""
        num_local = self.w1_EHF.shape[0]
        if tokens_per_expert_E.numel() != num_local:
            raise ValueError(f"tokens_per_expert has {tokens_per_expert_E.numel()} entries for {num_local} experts")
        splits = tokens_per_expert_E.tolist()  # host sync: split sizes must be Python ints
        # unbind once: indexing w[e] per expert would make backward build E full-size zero gradients
        w1s, w3s, w2s = self.w1_EHF.unbind(0), self.w3_EHF.unbind(0), self.w2_EFH.unbind(0)
        outs = []
        for x_MH, w1_HF, w3_HF, w2_FH in zip(torch.split(x_sorted_NH, splits), w1s, w3s, w2s, strict=True):
            h_MF = F.silu(x_MH @ w1_HF) * (x_MH @ w3_HF)
            outs.append(h_MF @ w2_FH)
        if not outs:
            return x_sorted_NH.new_zeros(0, x_sorted_NH.shape[-1])
        return torch.cat(outs)
