"""C++ kernels against their pure-PyTorch references (bitwise: a permute moves bytes)."""

from __future__ import annotations

import os

import pytest
import torch

from moe_train.kernels import HAS_EXTENSION, permute_rows, permute_rows_reference

needs_ext = pytest.mark.skipif(
    not HAS_EXTENSION and os.environ.get("MOE_TRAIN_REQUIRE_EXT") != "1",
    reason="C++ extension not built",
)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_permute_rows_matches_reference_bitwise(dtype: torch.dtype) -> None:
    assert HAS_EXTENSION, "MOE_TRAIN_REQUIRE_EXT=1 but moe_train._C is not importable"
    gen = torch.Generator().manual_seed(0)
    x_TH = torch.randn(37, 24, generator=gen).to(dtype)
    index_N = torch.randint(0, 37, (74,), generator=gen)
    out = permute_rows(x_TH, index_N)
    assert torch.equal(out.view(torch.uint8), permute_rows_reference(x_TH, index_N).view(torch.uint8))


@needs_ext
def test_permute_rows_rejects_bad_index() -> None:
    from moe_train import _C  # type: ignore[attr-defined]

    with pytest.raises(RuntimeError, match="out of range"):
        _C.permute_rows(torch.zeros(3, 2), torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="1-D int64"):
        _C.permute_rows(torch.zeros(3, 2), torch.tensor([0, 1], dtype=torch.int32))


def test_reference_is_a_gather() -> None:
    x_TH = torch.arange(12.0).view(4, 3)
    out = permute_rows_reference(x_TH, torch.tensor([3, 0, 0]))
    assert out.tolist() == [[9.0, 10.0, 11.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]
