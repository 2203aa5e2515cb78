"""The compiled extensions of csrc/ and the choice of backend for one call.

`moe_train._C` holds the CPU kernels (OpenMP), `moe_train._C_cuda` the CUDA kernels; both expose the
same functions. Either may be missing (see setup.py); then 'auto' uses the pure-PyTorch references.
"""

from __future__ import annotations

from types import ModuleType

import torch

try:
    from moe_train import _C  # type: ignore[attr-defined]
except ImportError:
    _C = None
try:
    from moe_train import _C_cuda  # type: ignore[attr-defined]
except ImportError:
    _C_cuda = None

HAS_EXTENSION = _C is not None
"""Whether the CPU extension moe_train._C is built."""
HAS_CUDA_EXTENSION = _C_cuda is not None
"""Whether the CUDA extension moe_train._C_cuda is built."""
BACKENDS = ("auto", "cuda", "cpu", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
"""Row dtypes the compiled kernels move; others go to the references under 'auto'."""


def check_backend(backend: str) -> None:
    """Raise ValueError (one line) when `backend` is unknown or its extension is not built."""
    if backend not in BACKENDS:
        raise ValueError(f"dispatch backend {backend!r} must be one of {', '.join(BACKENDS)}")
    if backend == "cpu" and _C is None:
        raise ValueError("dispatch backend 'cpu' needs the C++ extension moe_train._C, which is not built")
    if backend == "cuda" and _C_cuda is None:
        raise ValueError(
            "dispatch backend 'cuda' needs the CUDA extension moe_train._C_cuda, which is not built "
            "(it needs a CUDA toolkit and a CUDA build of torch at install time)"
        )


def kernel_module(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> ModuleType | None:
    """The extension module that serves a call on `device` with rows of `dtype`, or None for PyTorch."""
    if backend == "torch":
        return None
    supported = dtype is None or dtype in KERNEL_DTYPES
    module = _C_cuda if device.type == "cuda" else _C if device.type == "cpu" else None
    if backend == "auto":
        return module if supported else None
    check_backend(backend)
    if device.type != backend:
        raise ValueError(f"dispatch backend {backend!r} got tensors on {device}")
    if not supported:
        raise ValueError(f"dispatch backend {backend!r} supports rows of {KERNEL_DTYPES}, got {dtype}")
    return module
