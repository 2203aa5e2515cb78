"""Routed experts as grouped SwiGLU weights.

Legend: E local experts, H hidden, F expert ffn hidden, N token copies sorted by expert,
M copies of one expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.kernels import silu_mul
from moe_train.model.recompute import checkpoint_local


def expert_swiglu(
    x_sorted_NH: torch.Tensor,
    w1_EHF: torch.Tensor,
    w3_EHF: torch.Tensor,
    w2_EFH: torch.Tensor,
    splits: list[int],
    fuse_gate_up: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """One matmul chain per expert over its contiguous slice of copies -> y_sorted_NH.

    fuse_gate_up: one GEMM per expert against [w1 | w3] (concatenated once per call, so the parameters
    keep their shapes) instead of two. backend: the kernels' backend for silu(gate) * up
    (moe_train.kernels.silu_mul)."""
    # unbind once: indexing w[e] per expert would make backward build E full-size zero gradients
    w2s = w2_EFH.unbind(0)
    xs = torch.split(x_sorted_NH, splits)
    outs = []
    if fuse_gate_up:
        ffn = w1_EHF.shape[-1]
        for x_MH, w13_HG, w2_FH in zip(xs, torch.cat([w1_EHF, w3_EHF], dim=2).unbind(0), w2s, strict=True):
            g_MG = x_MH @ w13_HG  # G = 2F: gate | up
            outs.append(silu_mul(g_MG[:, :ffn], g_MG[:, ffn:], backend=backend) @ w2_FH)
    else:
        for x_MH, w1_HF, w3_HF, w2_FH in zip(xs, w1_EHF.unbind(0), w3_EHF.unbind(0), w2s, strict=True):
            h_MF = silu_mul(x_MH @ w1_HF, x_MH @ w3_HF, backend=backend)
            outs.append(h_MF @ w2_FH)
    if not outs:
        return x_sorted_NH.new_zeros(0, x_sorted_NH.shape[-1])
    return torch.cat(outs)


def grouped_mm_usable(*tensors: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM (`F.grouped_mm`, torch >= 2.8) takes these operands: CPU (any float
    dtype) or CUDA bf16, one dtype and no autocast, every row stride and base address a multiple of
    16 bytes."""
    if not hasattr(F, "grouped_mm"):
        return False
    first = tensors[0]
    if first.device.type not in ("cpu", "cuda") or torch.is_autocast_enabled(first.device.type):
        return False  # under autocast the loop's matmuls cast; grouped_mm needs one dtype already
    if any(t.dtype != first.dtype for t in tensors):
        return False
    if first.device.type == "cuda" and first.dtype != torch.bfloat16:
        return False
    return all(
        t.is_contiguous() and (t.shape[-1] * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0 for t in tensors
    )


def expert_swiglu_grouped(
    x_sorted_NH: torch.Tensor,
    w1_EHF: torch.Tensor,
    w3_EHF: torch.Tensor,
    w2_EFH: torch.Tensor,
    offsets_E: torch.Tensor,
    fuse_gate_up: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """`expert_swiglu` as grouped GEMMs over every expert at once; `offsets_E` (int32, on the device) is
    the cumulative row count, so no split size has to reach the host. fuse_gate_up: one grouped GEMM
    against [w1 | w3] (concatenated per call) instead of two. backend: as in `expert_swiglu`."""
    if fuse_gate_up:
        g_NG = F.grouped_mm(x_sorted_NH, torch.cat([w1_EHF, w3_EHF], dim=2), offs=offsets_E)  # G = 2F
        gate_NF, up_NF = g_NG.chunk(2, dim=-1)
    else:
        gate_NF = F.grouped_mm(x_sorted_NH, w1_EHF, offs=offsets_E)
        up_NF = F.grouped_mm(x_sorted_NH, w3_EHF, offs=offsets_E)
    return F.grouped_mm(silu_mul(gate_NF, up_NF, backend=backend), w2_EFH, offs=offsets_E)


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
        self.grouped_mm = True
        """Use torch's grouped GEMM where it takes the operands (`grouped_mm_usable`), else the loop."""
        self.kernel_backend = "auto"
        """Backend of the fused silu(gate) * up kernel (moe.dispatch.backend; moe_train.kernels.silu_mul)."""
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """normal(0, std) for w1/w3 and normal(0, out_std or std) for w2."""
        nn.init.normal_(self.w1_EHF, std=std)
        nn.init.normal_(self.w3_EHF, std=std)
        nn.init.normal_(self.w2_EFH, std=std if out_std is None else out_std)

    def forward(self, x_sorted_NH: torch.Tensor, tokens_per_expert: torch.Tensor | list[int]) -> torch.Tensor:
        """Copies grouped by expert and each expert's count -> y_sorted_NH.

        With torch's grouped GEMM (`grouped_mm_usable`) the counts stay on the device; otherwise the
        per-expert loop needs them on the host (a device tensor costs one host sync here)."""
        num_local = self.w1_EHF.shape[0]
        count = tokens_per_expert.numel() if isinstance(tokens_per_expert, torch.Tensor) else len(tokens_per_expert)
        if count != num_local:
            raise ValueError(f"tokens_per_expert has {count} entries for {num_local} experts")
        weights = (self.w1_EHF, self.w3_EHF, self.w2_EFH)
        if self.grouped_mm and grouped_mm_usable(x_sorted_NH, *weights):
            counts_E = torch.as_tensor(tokens_per_expert, device=x_sorted_NH.device)
            offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
            grouped = (x_sorted_NH, *weights, offsets_E, self.fuse_gate_up, self.kernel_backend)
            return (
                checkpoint_local(expert_swiglu_grouped, *grouped) if self.recompute else expert_swiglu_grouped(*grouped)
            )
        if isinstance(tokens_per_expert, torch.Tensor):
            tokens_per_expert = tokens_per_expert.tolist()  # host sync: split sizes must be Python ints
        args = (x_sorted_NH, *weights, tokens_per_expert, self.fuse_gate_up, self.kernel_backend)
        return checkpoint_local(expert_swiglu, *args) if self.recompute else expert_swiglu(*args)
