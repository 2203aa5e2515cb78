"""Kernels: Python wrappers over the C++/CUDA extensions (csrc/) with a pure-PyTorch reference for each op."""

from moe_train.kernels._ext import BACKENDS, HAS_CUDA_EXTENSION, HAS_EXTENSION, check_backend
from moe_train.kernels.activation import silu_mul, silu_mul_reference
from moe_train.kernels.dispatch import (
    WIRE_DTYPES,
    Permuted,
    RowExchange,
    build_row_map,
    dequantize,
    dispatch_rows,
    num_kept_rows,
    permute,
    unpermute,
)
from moe_train.kernels.fp8 import FP8_MAX, dequantize_reference, quantize_fp8_reference
from moe_train.kernels.gather import permute_rows, permute_rows_reference

__all__ = [
    "BACKENDS",
    "FP8_MAX",
    "HAS_CUDA_EXTENSION",
    "HAS_EXTENSION",
    "WIRE_DTYPES",
    "Permuted",
    "RowExchange",
    "build_row_map",
    "check_backend",
    "dequantize",
    "dequantize_reference",
    "dispatch_rows",
    "num_kept_rows",
    "permute",
    "permute_rows",
    "permute_rows_reference",
    "quantize_fp8_reference",
    "silu_mul",
    "silu_mul_reference",
    "unpermute",
]
