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


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 3) -> float:
    """Achievable fp32 matmul FLOP/s of this CPU (best of a few size³ matmuls): MFU's denominator on CPU."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s used for MFU: a table for known GPUs, a measured matmul probe on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        log.warning("unknown GPU %s: MFU assumes 312 TFLOP/s", name)
        return 312e12
    return measure_cpu_peak_flops()


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
        for domain, value in record.get("domain_loss", {}).items():
            self.tb.add_scalar(f"train_domain/{domain}", value, step)
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


def format_progress(record: dict[str, Any], max_steps: int, eta_s: float) -> str:
    """One console line: step, loss, lr, tokens/s, MFU, ETA."""
    eta = time.strftime("%H:%M:%S", time.gmtime(max(0.0, eta_s)))
    return (
        f"step {record['step']:>6}/{max_steps} | loss {record['loss']:.4f} (lm {record['lm_loss']:.4f} "
        f"lbl {record['lbl']:.3f}) | lr {record['lr']:.2e} | grad {record['grad_norm']:.3f} | "
        f"{record['tokens_per_s']:,.0f} tok/s | MFU {100 * record['mfu']:.1f}% | ETA {eta}"
    )
