"""Kernels: thin wrappers over the optional C++ extension (csrc/) with a pure-PyTorch reference each."""

from moe_train.kernels.permute import HAS_EXTENSION, permute_rows, permute_rows_reference

__all__ = ["HAS_EXTENSION", "permute_rows", "permute_rows_reference"]
