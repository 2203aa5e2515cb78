"""Suite-wide settings: no test writes to the user's cache.

The CPU peak-FLOPs probe cache (moe_train.train.peak) points at a file of this session, set in the
environment so spawned ranks and CLI subprocesses share it (one probe per thread count per session).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

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
