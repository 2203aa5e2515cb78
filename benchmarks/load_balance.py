"""Cost of the exact global-batch LBL: step time and peak memory against the micro-batch LBL, same run.

Both trainers hold the same model (configs/tiny_cpu.yaml by default, random-token batches from
data.mock) and train on the same batches; only moe.lbl.scope differs ('micro_batch' vs 'global'
with global_mode 'exact', whose step adds a no-grad counting pass over the micro-batches). Steps
alternate between the two (the global one first on odd repetitions), so both see the same machine
load; the table gives the median of the per-repetition ratios (global / micro step time) with their
range, and the median time of the counting pass alone. Peak memory (`--memory`): each mode runs 3
steps in a fresh process that samples glibc's live heap (mallinfo2: bytes in use, small and mmapped
blocks; freed memory is not counted, unlike RSS) after every module's forward and backward; the
table gives the peak over a step minus the live heap before it (activations, gradients and
temporaries). The counting pass keeps no autograd graph, so the peaks should agree.

    .venv/bin/python benchmarks/load_balance.py                      # demo model, 2 and 8 micro-batches
    .venv/bin/python benchmarks/load_balance.py --micro 2 --steps 10 train.seq_len=128
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_train.config import load_config
from moe_train.train.trainer import Trainer

SCOPES = {"micro": ["moe.lbl.scope=micro_batch"], "global": ["moe.lbl.scope=global", "moe.lbl.global_mode=exact"]}


def _trainer(config: str, scope: str, overrides: list[str]) -> Trainer:
    base = [
        "data.mock=true",
        "train.eval_every=0",
        "checkpoint.every=0",
        "log.tensorboard=false",
        "log.level=WARNING",
        f"run.dir={tempfile.mkdtemp(prefix='lbl_bench_')}",
    ]
    return Trainer(load_config(config, [*base, *SCOPES[scope], *overrides]))


def _timed_step(trainer: Trainer) -> tuple[float, float]:
    """(step seconds, counting-pass seconds) of one training step."""
    begin = trainer.balancer.begin_step
    spent = [0.0]

    def timed_begin(*args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        begin(*args, **kwargs)
        spent[0] += time.perf_counter() - start

    trainer.balancer.begin_step = timed_begin  # type: ignore[method-assign]
    start = time.perf_counter()
    trainer.train_step()
    trainer.state.consumed_samples += trainer.cfg.train.global_batch_size
    elapsed = time.perf_counter() - start
    trainer.balancer.begin_step = begin  # type: ignore[method-assign]
    return elapsed, spent[0]


def time_modes(config: str, micro: int, steps: int, overrides: list[str]) -> dict:
    extra = [*overrides, f"train.micro_batch_size={micro}"]
    trainers = {scope: _trainer(config, scope, extra) for scope in SCOPES}
    for t in trainers.values():  # warmup
        _timed_step(t)
    ratios, counting, times = [], [], {s: [] for s in SCOPES}
    for rep in range(steps):
        order = ["global", "micro"] if rep % 2 else ["micro", "global"]
        got = {scope: _timed_step(trainers[scope]) for scope in order}
        for scope in SCOPES:
            times[scope].append(got[scope][0])
        ratios.append(got["global"][0] / got["micro"][0])
        counting.append(got["global"][1] / got["global"][0])
    cfg = trainers["micro"].cfg.train
    return {
        "micro_batches": cfg.global_batch_size // micro,
        "tokens_per_step": cfg.global_batch_size * cfg.seq_len,
        "micro_step_s": statistics.median(times["micro"]),
        "global_step_s": statistics.median(times["global"]),
        "ratio_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "counting_share_median": statistics.median(counting),
    }


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def _live_heap_sampler() -> tuple[list[int], object]:
    """A list that gets glibc's live heap bytes after every module forward / backward, and the libc."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    samples: list[int] = []

    def sample(*_: object) -> None:
        info = libc.mallinfo2()
        samples.append(info.uordblks + info.hblkhd)

    torch.nn.modules.module.register_module_forward_hook(sample)
    torch.nn.modules.module.register_module_full_backward_hook(sample)
    return samples, libc


def step_heap_peak(config: str, scope: str, micro: int, overrides: list[str]) -> float:
    """Peak live heap over a training step above the heap before it (MiB), in a fresh process."""
    cmd = [sys.executable, __file__, "--config", config, "--heap-child", scope, "--micro", str(micro), *overrides]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def _heap_child(config: str, scope: str, micro: int, overrides: list[str]) -> float:
    trainer = _trainer(config, scope, [*overrides, f"train.micro_batch_size={micro}"])
    _timed_step(trainer)  # warmup: optimizer state exists from here on
    samples, libc = _live_heap_sampler()
    peaks = []
    for _ in range(2):
        info = libc.mallinfo2()  # type: ignore[attr-defined]
        before = info.uordblks + info.hblkhd
        samples.clear()
        _timed_step(trainer)
        peaks.append(max(samples) - before)
    return max(peaks) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--micro", type=int, nargs="+", default=[8, 2], help="micro-batch sizes to measure")
    parser.add_argument("--steps", type=int, default=8, help="timed repetitions per mode")
    parser.add_argument("--memory", action="store_true", help="also measure the step's peak heap (fresh processes)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--heap-child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.heap_child:
        print(_heap_child(args.config, args.heap_child, args.micro[0], args.overrides))
        return
    rows = []
    print(
        "| micro-batches | tokens/step | micro-batch LBL step | exact global step | global/micro (range) | counting pass share |"
    )
    print("|---:|---:|---:|---:|---|---:|")
    for micro in args.micro:
        row = time_modes(args.config, micro, args.steps, args.overrides)
        if args.memory:
            row["step_heap_peak_mib"] = {s: step_heap_peak(args.config, s, micro, args.overrides) for s in SCOPES}
        rows.append(row)
        lo, hi = row["ratio_range"]
        print(
            f"| {row['micro_batches']} | {row['tokens_per_step']} | {row['micro_step_s']:.2f} s |"
            f" {row['global_step_s']:.2f} s | {row['ratio_median']:.2f}x ({lo:.2f}-{hi:.2f}) |"
            f" {100 * row['counting_share_median']:.0f}% |",
            flush=True,
        )
        if args.memory:
            print(f"  step heap peak above the heap before the step (MiB): {row['step_heap_peak_mib']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
