"""Cost of verified checkpoints: the sha256 each rank adds to a save, and the verification on resume,
as ratios to the save itself (torch.save + fsync of the same shard), measured in the same run.

A shard of `--mb` MB of fp32 tensors is saved, hashed (moe_train.parallel.checkpoint_files.file_digest,
what every rank does after writing its shard) and verified (verify_checkpoint in 'sha256' and 'size'
mode) `--reps` times, alternating; medians and ranges are printed. The page cache is warm, as it is
right after a save; a cold read of a checkpoint on a network filesystem costs more.

    .venv/bin/python benchmarks/checkpoint_verify.py --mb 256 --reps 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moe_train.parallel.checkpoint_files import file_digest, verify_checkpoint, write_manifest


def _save(obj: dict[str, torch.Tensor], path: Path) -> None:
    with path.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="shard size in MB")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.mb * 2**20 // 4 // 8
    shard = {f"w{i}": torch.randn(n) for i in range(8)}
    times: dict[str, list[float]] = {"save": [], "hash": [], "verify_sha256": [], "verify_size": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for _ in range(args.reps):
            times["save"].append(_timed(lambda: _save(shard, root / "shard_00000.pt")))
            times["hash"].append(_timed(lambda: file_digest(root / "shard_00000.pt")))
            write_manifest(root)
            times["verify_sha256"].append(_timed(lambda: verify_checkpoint(root, "sha256")))
            times["verify_size"].append(_timed(lambda: verify_checkpoint(root, "size")))
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load[0]:.1f}")
    print(f"shard {args.mb} MB, {args.reps} repetitions (median [min, max] seconds; ratio to the save)")
    save = statistics.median(times["save"])
    for name, values in times.items():
        med = statistics.median(values)
        print(
            f"{name:14s} {med:8.3f} s [{min(values):.3f}, {max(values):.3f}]  ratio {med / save:.2f}  "
            f"{args.mb / med:8.0f} MB/s"
        )


if __name__ == "__main__":
    main()
