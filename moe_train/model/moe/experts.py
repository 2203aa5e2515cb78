"""Routed experts as grouped SwiGLU weights.

Legend: E local experts, H hidden, F expert ffn hidden, N token copies sorted by expert,
M copies of one expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.model.recompute import checkpoint_local


def expert_swiglu(
    x_sorted_NH: torch.Tensor,
    w1_EHF: torch.Tensor,
    w3_EHF: torch.Tensor,
    w2_EFH: torch.Tensor,
    splits: list[int],
    fuse_gate_up: bool = False,
) -> torch.Tensor:
    """One matmul chain per expert over its contiguous slice of copies -> y_sorted_NH.

    fuse_gate_up: one GEMM per expert against [w1 | w3] (concatenated once per call, so the parameters
    keep their shapes) instead of two."""
    # unbind once: indexing w[e] per expert would make backward build E full-size zero gradients
    w2s = w2_EFH.unbind(0)
    xs = torch.split(x_sorted_NH, splits)
    outs = []
    if fuse_gate_up:
        ffn = w1_EHF.shape[-1]
        for x_MH, w13_HG, w2_FH in zip(xs, torch.cat([w1_EHF, w3_EHF], dim=2).unbind(0), w2s, strict=True):
            g_MG = x_MH @ w13_HG  # G = 2F: gate | up
            outs.append((F.silu(g_MG[:, :ffn]) * g_MG[:, ffn:]) @ w2_FH)
    else:
        for x_MH, w1_HF, w3_HF, w2_FH in zip(xs, w1_EHF.unbind(0), w3_EHF.unbind(0), w2s, strict=True):
            h_MF = F.silu(x_MH @ w1_HF) * (x_MH @ w3_HF)
            outs.append(h_MF @ w2_FH)
    if not outs:
        return x_sorted_NH.new_zeros(0, x_sorted_NH.shape[-1])
    return torch.cat(outs)


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
        self.recompute = False
        """train.recompute 'selective': keep the dispatched rows, recompute the [N, F] intermediates."""
        self.fuse_gate_up = False
        """One GEMM per expert against [w1 | w3] (see `expert_swiglu`)."""
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """normal(0, std) for w1/w3 and normal(0, out_std or std) for w2."""
        nn.init.normal_(self.w1_EHF, std=std)
        nn.init.normal_(self.w3_EHF, std=std)
        nn.init.normal_(self.w2_EFH, std=std if out_std is None else out_std)

    def forward(self, x_sorted_NH: torch.Tensor, tokens_per_expert: torch.Tensor | list[int]) -> torch.Tensor:
        """Copies grouped by expert, and each expert's count (host ints preferred: a device tensor costs
        a host sync here) -> y_sorted_NH."""
        num_local = self.w1_EHF.shape[0]
        if isinstance(tokens_per_expert, torch.Tensor):
            tokens_per_expert = tokens_per_expert.tolist()  # host sync: split sizes must be Python ints
        if len(tokens_per_expert) != num_local:
            raise ValueError(f"tokens_per_expert has {len(tokens_per_expert)} entries for {num_local} experts")
        args = (x_sorted_NH, self.w1_EHF, self.w3_EHF, self.w2_EFH, tokens_per_expert, self.fuse_gate_up)
        return checkpoint_local(expert_swiglu, *args) if self.recompute else expert_swiglu(*args)
