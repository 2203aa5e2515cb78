"""Peak memory of a rank, reported per step as `peak_mem_gb` (the maximum over ranks, in GiB = 2^30 bytes).

On CUDA: `torch.cuda.max_memory_allocated` (tensors only, not the caching allocator's reserve). On CPU:
the process's resident-set high-water mark (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), which counts
everything the process ever held at once (Python, torch's libraries, the data loader's buffers), so it
is an upper bound on tensor memory. Both are high-water marks since the process started: they never
fall, and the value of step N is the peak of steps 1..N (and of the model build before them).

`moe-train train --dry-run` compares its per-rank estimate with this measurement when `run.dir` holds a
metrics.jsonl (`measured_peak_gb`).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from moe_train.parallel.groups import ProcessGroups

GIB = 2**30


def local_peak_bytes(device: torch.device) -> int:
    """This process's peak memory so far: CUDA max allocated on a GPU, RSS high-water mark on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # bytes on macOS, KiB on Linux


def peak_mem_gb(groups: ProcessGroups, device: torch.device) -> float:
    """The largest peak memory of any rank, in GiB (one small all-reduce MAX over the world)."""
    peak = torch.tensor([float(local_peak_bytes(device))], dtype=torch.float64, device=device)
    if groups.world_size > 1:
        groups.all_reduce(peak, "grad_norm", op=torch.distributed.ReduceOp.MAX)
    return float(peak.item()) / GIB


def measured_peak_gb(run_dir: str | Path) -> float | None:
    """The largest `peak_mem_gb` recorded in `run_dir`/metrics.jsonl, or None without one."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    values = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("peak_mem_gb"), int | float):
            values.append(float(record["peak_mem_gb"]))
    return max(values) if values else None
