"""Suite-wide settings.

No test writes to the user's cache: the CPU peak-FLOPs probe cache (moe_train.train.peak) points at a
file of this session, set in the environment so spawned ranks and CLI subprocesses share it (one probe
per thread count per session).

Tests marked `cuda` run where a CUDA GPU is visible and are skipped, with the reason, elsewhere. With a
GPU but without the CUDA extension they are skipped too, unless MOE_TRAIN_REQUIRE_EXT=1 (CI), where they
run and fail: a GPU machine whose install silently lost the CUDA kernels must not pass.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moe_train.train.peak import PEAK_CACHE_ENV


@pytest.fixture(scope="session", autouse=True)
def _private_peak_cache() -> Iterator[None]:
    with tempfile.TemporaryDirectory(prefix="moe_train-peak-") as tmp:
        previous = os.environ.get(PEAK_CACHE_ENV)
        os.environ[PEAK_CACHE_ENV] = str(Path(tmp) / "peak_flops.json")
        yield
        if previous is None:
            os.environ.pop(PEAK_CACHE_ENV, None)
        else:
            os.environ[PEAK_CACHE_ENV] = previous


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from moe_train.kernels import HAS_CUDA_EXTENSION

    if not torch.cuda.is_available():
        reason = "no CUDA GPU on this machine (CUDA kernels are compiled by launch/nvcc_check.sh only)"
    elif not HAS_CUDA_EXTENSION and os.environ.get("MOE_TRAIN_REQUIRE_EXT") != "1":
        reason = "CUDA extension moe_train._C_cuda not built"
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
