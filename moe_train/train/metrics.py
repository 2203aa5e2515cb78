"""Run outputs: `<run.dir>/metrics.jsonl` (one object per optimizer step), TensorBoard, console lines."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from moe_train.utils.logging import get_logger

log = get_logger(__name__)

# Peak dense bf16 tensor-core throughput (TFLOP/s) by GPU name fragment, for MFU.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 3, min_seconds: float = 0.0) -> float:
    """Achievable fp32 matmul FLOP/s of this CPU: the best of at least `repeats` size³ matmuls, timed
    one by one until `min_seconds` have passed (other load only ever slows a matmul down, so the best
    is the least disturbed). MFU's denominator on CPU (see moe_train.train.peak)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    deadline = time.perf_counter() + min_seconds
    done = 0
    while done < repeats or time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
        done += 1
    return 2 * size**3 / best


class MetricsWriter:
    """Writes metrics.jsonl and TensorBoard events (rank 0 only) and logs console progress."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb: Any = None
        if not enabled:
            return
        _truncate_after(self.path, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=resume_step + 1)

    def write_step(self, record: dict[str, Any], expert_counts_LE: torch.Tensor | None = None) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is None:
            return
        step = record["step"]
        for key in ("loss", "lm_loss", "lbl", "zloss", "lr", "grad_norm", "tokens_per_s", "mfu"):
            if key in record:
                self.tb.add_scalar(f"train/{key}", record[key], step)
        for key in ("skipped", "anomaly_nan", "anomaly_spike"):  # moe_train.train.anomaly
            if key in record:
                self.tb.add_scalar(f"anomaly/{key}", record[key], step)
        for domain, value in record.get("domain_loss", {}).items():
            self.tb.add_scalar(f"train_domain/{domain}", value, step)
        for group in ("mixture_target", "mixture_realised"):  # the data mixture (moe_train.data.loader)
            for domain, value in record.get(group, {}).items():
                self.tb.add_scalar(f"{group}/{domain}", value, step)
        if expert_counts_LE is not None:
            self._expert_load(expert_counts_LE, step)

    def _expert_load(self, counts_LE: torch.Tensor, step: int) -> None:
        for layer, counts_E in enumerate(counts_LE.float()):
            share_E = counts_E / counts_E.sum().clamp(min=1)
            self.tb.add_scalar(f"expert_load/layer{layer}_max_over_mean", float(share_E.max() * len(share_E)), step)
            self.tb.add_histogram(f"expert_load/layer{layer}", share_E, step)

    def write_routing(self, step: int, counts_LDE: torch.Tensor | None, domains: list[str], images: bool) -> None:
        """Domain x expert routing of the step (moe_train.analysis.routing): scalars, histograms, heatmaps."""
        if self.tb is None or counts_LDE is None:
            return
        from moe_train.analysis.routing import write_tensorboard

        write_tensorboard(self.tb, int(step), counts_LDE, domains, images)

    def write_eval(self, step: int, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "val_loss": losses}) + "\n")
        if self.tb is not None:
            for domain, value in losses.items():
                self.tb.add_scalar(f"val/{domain}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop records of steps after the checkpoint so metrics.jsonl has each step once."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if (at := _step_of(line)) is not None and at <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a line a crash left half-written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def format_progress(record: dict[str, Any], max_steps: int, eta_s: float | None) -> str:
    """One console line: step, loss, lr, tokens/s, MFU, peak memory (GiB, max over ranks), ETA
    (--:--:-- while warming up)."""
    eta = "--:--:--" if eta_s is None else time.strftime("%H:%M:%S", time.gmtime(max(0.0, eta_s)))
    mem = f" | mem {record['peak_mem_gb']:.2f} GiB" if "peak_mem_gb" in record else ""
    return (
        f"step {record['step']:>6}/{max_steps} | loss {record['loss']:.4f} (lm {record['lm_loss']:.4f} "
        f"lbl {record['lbl']:.3f}) | lr {record['lr']:.2e} | grad {record['grad_norm']:.3f} | "
        f"{record['tokens_per_s']:,.0f} tok/s | MFU {100 * record['mfu']:.1f}%{mem} | ETA {eta}"
    )


class EtaEstimator:
    """Time left in a run: the median of the last `window` step times, the first `warmup` steps of this
    process left out (they pay for allocation, caches and compilation), times the steps left, plus
    the validations still to come at the cost of the last one.

    The median ignores the occasional slow step (a checkpoint, another process's burst); before any
    step after warm-up there is no estimate (None)."""

    def __init__(self, warmup: int = 2, window: int = 20) -> None:
        self.warmup = warmup
        self.window = window
        self.seen = 0
        self.recent: list[float] = []
        self.eval_s: float | None = None

    def add_step(self, seconds: float) -> None:
        """Record one optimizer step's wall time."""
        self.seen += 1
        if self.seen > self.warmup:
            self.recent = [*self.recent, seconds][-self.window :]

    def add_eval(self, seconds: float) -> None:
        """Record one validation's wall time (the next ones are assumed to cost the same)."""
        self.eval_s = seconds

    def eta(self, steps_left: int, evals_left: int = 0) -> float | None:
        """Seconds until the end (0 when nothing is left); None while only warm-up steps have been seen."""
        if steps_left <= 0 and evals_left <= 0:
            return 0.0
        if not self.recent:
            return None
        ordered = sorted(self.recent)
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
        return steps_left * median + evals_left * (self.eval_s or 0.0)
