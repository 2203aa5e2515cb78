"""MFU's denominator: the peak FLOP/s of one device, and MFU itself, never above 100%.

- `log.peak_tflops` set: that, per device.
- GPU: a table of dense bf16 tensor-core peaks by device name.
- CPU: no spec sheet to read, so the peak is measured: the best of many fp32 1024³ matmuls over about
  a second (best-of, because other load only ever slows a matmul down). The result is cached per
  machine in ``~/.cache/moe_train/peak_flops.json`` (``$MOE_TRAIN_PEAK_CACHE`` names another file),
  keyed by CPU model, torch threads and torch version, so every run on a machine divides by the same
  number and a busy start-up cannot shrink it. Deleting the file re-probes.

A throughput above the peak means the peak is wrong (a probe disturbed by other load, or a
`log.peak_tflops` that is too low): `MfuMeter` then reports 100% and says so once.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_train.train.metrics import GPU_PEAK_TFLOPS, measure_cpu_peak_flops
from moe_train.utils.logging import get_logger

log = get_logger(__name__)

PEAK_CACHE_ENV = "MOE_TRAIN_PEAK_CACHE"
PROBE_SIZE = 1024
PROBE_SECONDS = 1.0
PROBE_MIN_REPEATS = 10
FALLBACK_GPU_TFLOPS = 312.0


@dataclass(frozen=True)
class Peak:
    """Peak FLOP/s of one device and where the number came from (named in warnings)."""

    flops: float
    source: str


def peak_cache_path() -> Path:
    """The probe cache: $MOE_TRAIN_PEAK_CACHE if set, else ~/.cache/moe_train/peak_flops.json."""
    env = os.environ.get(PEAK_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moe_train" / "peak_flops.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def machine_key() -> str:
    """What the CPU probe depends on: CPU model, torch threads, torch version."""
    return f"{_cpu_model()} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, flops: float) -> None:
    """Add one entry; written to a temporary file and renamed (concurrent ranks never see half a file)."""
    entries = _read_cache(path)
    entries[key] = {
        "flops": flops,
        "probe": f"best fp32 {PROBE_SIZE}^3 matmul over {PROBE_SECONDS:g} s",
        "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=2)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not cache the CPU peak-FLOPs probe in %s (%s); the next run probes again", path, exc)


def cpu_peak(path: Path | None = None) -> Peak:
    """This machine's cached CPU probe, probing (about a second) and caching on the first call."""
    path = path or peak_cache_path()
    key = machine_key()
    entry = _read_cache(path).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
        return Peak(float(entry["flops"]), f"CPU probe cached in {path}")
    flops = measure_cpu_peak_flops(PROBE_SIZE, PROBE_MIN_REPEATS, PROBE_SECONDS)
    log.info("CPU peak %.3f TFLOP/s (matmul probe; cached in %s for %s)", flops / 1e12, path, key)
    _write_cache(path, key, flops)
    return Peak(flops, f"CPU probe cached in {path}")


def device_peak(device: torch.device, peak_tflops: float | None = None) -> Peak:
    """Peak FLOP/s of one device: the override, the GPU table, or the cached CPU probe."""
    if peak_tflops is not None:
        return Peak(peak_tflops * 1e12, f"log.peak_tflops={peak_tflops:g}")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return Peak(tflops * 1e12, f"table entry {key}")
        log.warning("unknown GPU %s: MFU assumes %g TFLOP/s (set log.peak_tflops)", name, FALLBACK_GPU_TFLOPS)
        return Peak(FALLBACK_GPU_TFLOPS * 1e12, f"default for unknown GPU {name}")
    return cpu_peak()


@dataclass
class MfuMeter:
    """Model FLOPs utilisation in [0, 1] against `devices` times the per-device peak.

    A throughput above the peak is reported as 1.0, with one warning (when `warn`) naming the peak's
    source and what to do about it."""

    peak: Peak
    devices: int = 1
    warn: bool = True
    clamped: int = field(default=0, init=False)

    def __call__(self, achieved_flops: float) -> float:
        mfu = achieved_flops / (self.peak.flops * self.devices)
        if mfu <= 1.0:
            return mfu
        if self.clamped == 0 and self.warn:
            log.warning(
                "MFU would be %.0f%%: the peak (%.3f TFLOP/s per device, %s) is too low, most likely a probe "
                "disturbed by other load; reporting 100%%. Set log.peak_tflops to this device's peak%s",
                100 * mfu,
                self.peak.flops / 1e12,
                self.peak.source,
                " or delete the cache file to re-probe" if "cached" in self.peak.source else "",
            )
        self.clamped += 1
        return 1.0
