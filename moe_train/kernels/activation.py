"""SwiGLU's activation, silu(gate) * up, as one C++ pass forward and one backward (csrc/cpu/swiglu.cpp).

torch's eager path takes three passes forward (silu, the product, and autograd keeps silu(gate) as a
third [N, F] tensor) and three backward (two products and silu's backward). The kernel reads gate and
up once, keeps only them for backward, and writes d_gate and d_up in one pass. CPU float32 only; other
devices and dtypes, and code being traced by torch.compile (inductor fuses the reference itself), use
the reference `silu_mul_reference`.

Legend: `*` any shape (gate and up alike).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from moe_train.kernels._ext import kernel_module


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch reference: silu(gate) * up."""
    return F.silu(gate) * up


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, module: ModuleType) -> Any:
        ctx.save_for_backward(gate, up)
        ctx.module = module
        return module.swiglu(gate, up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = ctx.module.swiglu_backward(grad.contiguous(), gate, up)
        return grad_gate, grad_up, None


def silu_mul_module(gate: torch.Tensor, up: torch.Tensor, backend: str) -> ModuleType | None:
    """The extension that computes silu(gate) * up for these operands under `backend`, or None."""
    if gate.dtype != torch.float32 or up.dtype != torch.float32 or gate.shape != up.shape:
        return None
    if torch.compiler.is_compiling():
        return None
    module = kernel_module(backend, gate.device, gate.dtype)
    return module if module is not None and hasattr(module, "swiglu") else None


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up (differentiable): the C++ kernel where `silu_mul_module` finds one, else the reference."""
    module = silu_mul_module(gate, up, backend)
    if module is None:
        return silu_mul_reference(gate, up)
    out: torch.Tensor = _SiluMul.apply(gate, up, module)
    return out
