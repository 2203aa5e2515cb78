"""Cluster descriptions for the planner: hardware per GPU, the network, and the achieved-efficiency constants.

A `Cluster` is what the memory and step-time models know about the machines: GPUs per node and per
NVLink domain (the set of GPUs joined by the fast fabric: a node of 8 on H100 / B200, a 72-GPU rack on
GB200 NVL72), peak dense FLOP/s per GPU, HBM size and bandwidth, the per-GPU bandwidth and latency of
the intra-domain fabric (NVLink) and of the inter-domain network (InfiniBand, one NIC per GPU), and the
host link used by optimizer offload.

Hardware numbers are the vendors' datasheet figures (dense, no sparsity). The *achieved* fractions
live in one `Efficiency` object, `GPU_EFFICIENCY`, shared by every GPU preset: the planner has no
per-model or per-run constant. How those fractions were set is written next to them and in
docs/planner.md. `cpu-local` is this machine: its constants are meant to be measured
(`measure_cpu_cluster`), which is what the CPU calibration compares against.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

GB = 1e9
TB = 1e12


@dataclass(frozen=True)
class Efficiency:
    """Fractions of datasheet peaks that real kernels and collectives reach (one set per kind of machine)."""

    gemm: float
    """Achieved fraction of peak FLOP/s of a large GEMM (bf16, or fp8 against the fp8 peak)."""
    gemm_fp8: float
    """Achieved fraction of the fp8 peak of FP8 GEMMs (block-scaled recipes: scaling and layout overheads)."""
    gemm_half_rows: float
    """Rows at which a GEMM reaches half of `gemm` (small per-expert GEMMs run below peak): eff(m) = gemm * m / (m + half)."""
    attention_fwd: float
    """Achieved fraction of peak of fused causal attention, forward."""
    attention_bwd: float
    """Same, backward (FLOPs counted as 2.5x forward, the flash-attention convention)."""
    hbm: float
    """Achieved fraction of HBM bandwidth of element-wise kernels (norms, activations, permutes, casts)."""
    network: float
    """Achieved fraction of link bandwidth of NCCL collectives (bus bandwidth / link bandwidth)."""


GPU_EFFICIENCY = Efficiency(
    gemm=0.70,
    gemm_fp8=0.45,
    gemm_half_rows=128.0,
    attention_fwd=0.55,
    attention_bwd=0.45,
    hbm=0.30,
    network=0.75,
)
"""The one set of achieved fractions used for every GPU cluster and every validation.

Set a priori: gemm 0.70 (bf16 GEMMs of training shapes reach ~65-75% of the H100 / B200 dense peaks),
attention 0.55 / 0.45 (cuDNN SDPA for DeepSeek-V3 shapes at 4k tokens, arXiv 2603.07685 Table 9:
553 / 422 TFLOP/s forward / backward on H100), network 0.75 (NCCL bus bandwidth / link bandwidth).
Fitted: gemm_fp8 0.45 (FP8 GEMMs 1.29x the bf16 rate, not 2x) and hbm 0.30 (the counted element-wise
bytes are a lower bound of what a framework moves) were chosen by a grid search over the four
validation runs jointly (worst relative error), so for these two constants the validation is
in-sample; docs/planner.md gives the sensitivity to each constant and held-out runs. No per-model or
per-run constant exists.
"""


@dataclass(frozen=True)
class Cluster:
    """One kind of GPU cluster (per-GPU figures; bandwidths per direction)."""

    name: str
    gpus_per_node: int
    nvlink_domain: int
    """GPUs sharing the intra-domain fabric (8 in an HGX node, 72 in a GB200 NVL72 rack)."""
    peak_flops_bf16: float
    peak_flops_fp8: float
    hbm_bytes: float
    hbm_bandwidth: float
    intra_bandwidth: float
    """Per-GPU bandwidth of the intra-domain fabric, one direction (bytes/s)."""
    intra_latency: float
    inter_bandwidth: float
    """Per-GPU bandwidth of the inter-domain network, one direction (bytes/s)."""
    inter_latency: float
    host_bandwidth: float
    """GPU <-> host memory bandwidth (PCIe or NVLink-C2C), for optimizer offload."""
    efficiency: Efficiency = field(default=GPU_EFFICIENCY)
    reserved_bytes: float = 4 * GB
    """Memory the planner keeps free: CUDA context, NCCL buffers, allocator fragmentation."""
    peak_flops_fp32: float = 0.0
    """Dense fp32 peak (used when train.precision is fp32); 0 means bf16 peak / 2 (TF32-class)."""

    def peak(self, precision: str) -> float:
        """Peak FLOP/s of GEMMs in `precision` ('fp8', 'bf16' or 'fp32')."""
        if precision == "fp8":
            return self.peak_flops_fp8
        if precision == "fp32":
            return self.peak_flops_fp32 or self.peak_flops_bf16 / 2
        return self.peak_flops_bf16

    @property
    def usable_bytes(self) -> float:
        """HBM the planner lets a rank fill."""
        return self.hbm_bytes - self.reserved_bytes


def _gpu(name: str, **kw: float) -> Cluster:
    return Cluster(name=name, **kw)  # type: ignore[arg-type]


CLUSTERS: dict[str, Cluster] = {
    # HGX H100 SXM: 8 GPUs on NVLink 4 (900 GB/s bidirectional), one 400 Gb/s InfiniBand NIC per GPU.
    "h100-ib": _gpu(
        "h100-ib",
        gpus_per_node=8,
        nvlink_domain=8,
        peak_flops_bf16=989e12,
        peak_flops_fp8=1979e12,
        hbm_bytes=80 * GB,
        hbm_bandwidth=3.35 * TB,
        intra_bandwidth=450 * GB,
        intra_latency=5e-6,
        inter_bandwidth=50 * GB,
        inter_latency=10e-6,
        host_bandwidth=64 * GB,
    ),
    # HGX H200: H100 compute, 141 GB HBM3e at 4.8 TB/s.
    "h200-ib": _gpu(
        "h200-ib",
        gpus_per_node=8,
        nvlink_domain=8,
        peak_flops_bf16=989e12,
        peak_flops_fp8=1979e12,
        hbm_bytes=141 * GB,
        hbm_bandwidth=4.8 * TB,
        intra_bandwidth=450 * GB,
        intra_latency=5e-6,
        inter_bandwidth=50 * GB,
        inter_latency=10e-6,
        host_bandwidth=64 * GB,
    ),
    # HGX B200: NVLink 5 (1.8 TB/s bidirectional), 180 GB HBM3e at 8 TB/s, 400 Gb/s NIC per GPU.
    "b200-ib": _gpu(
        "b200-ib",
        gpus_per_node=8,
        nvlink_domain=8,
        peak_flops_bf16=2.25e15,
        peak_flops_fp8=4.5e15,
        hbm_bytes=180 * GB,
        hbm_bandwidth=8 * TB,
        intra_bandwidth=900 * GB,
        intra_latency=5e-6,
        inter_bandwidth=50 * GB,
        inter_latency=10e-6,
        host_bandwidth=64 * GB,
    ),
    # GB200 NVL72: 4 GPUs per compute tray, 72 on one NVLink 5 domain, 186 GB HBM3e, NVLink-C2C to Grace.
    "gb200-nvl72": _gpu(
        "gb200-nvl72",
        gpus_per_node=4,
        nvlink_domain=72,
        peak_flops_bf16=2.5e15,
        peak_flops_fp8=5.0e15,
        hbm_bytes=186 * GB,
        hbm_bandwidth=8 * TB,
        intra_bandwidth=900 * GB,
        intra_latency=5e-6,
        inter_bandwidth=50 * GB,
        inter_latency=10e-6,
        host_bandwidth=450 * GB,
    ),
}

CPU_EFFICIENCY = Efficiency(
    gemm=1.0, gemm_fp8=1.0, gemm_half_rows=0.0, attention_fwd=0.5, attention_bwd=0.5, hbm=1.0, network=1.0
)
"""On cpu-local the peaks are *measured* achieved rates, so the fractions are 1 except attention."""


def cpu_local(
    matmul_flops: float = 50e9, memory_bandwidth: float = 5 * GB, gloo_bandwidth: float = 1 * GB, ram: float = 24 * GB
) -> Cluster:
    """This machine as a one-node 'cluster' of ranks sharing the CPU (fp32 compute, gloo over loopback).

    The defaults are round numbers for a 2-core machine; `measure_cpu_cluster()` measures them. The CPU
    calibration (predicted vs measured peak memory and step time of the demo config) compares against
    a cluster built from measurements.
    """
    return Cluster(
        name="cpu-local",
        gpus_per_node=1024,
        nvlink_domain=1024,
        peak_flops_bf16=matmul_flops / 100,  # bf16 matmuls are ~100x slower than fp32 on these CPUs
        peak_flops_fp8=matmul_flops / 100,
        peak_flops_fp32=matmul_flops,
        hbm_bytes=ram,
        hbm_bandwidth=memory_bandwidth,
        intra_bandwidth=gloo_bandwidth,
        intra_latency=50e-6,
        inter_bandwidth=gloo_bandwidth,
        inter_latency=50e-6,
        host_bandwidth=memory_bandwidth,
        efficiency=CPU_EFFICIENCY,
        reserved_bytes=1 * GB,
    )


def measure_cpu_cluster(size: int = 1024, copy_mb: int = 256, world_size: int = 1) -> Cluster:
    """`cpu_local` with this machine's measured fp32 matmul FLOP/s and memory-copy bandwidth.

    The fp32 rate is shared by `world_size` ranks on the same cores (each rank gets 1 / world_size);
    gloo bandwidth is taken as the copy bandwidth / 2 (loopback: a send and a receive copy).
    """
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(3))
    flops = 2 * size**3 / best
    src = torch.empty(copy_mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_s = min(_timed(lambda: dst.copy_(src)) for _ in range(3))
    bandwidth = 2 * src.numel() * 4 / copy_s
    share = max(1, world_size)
    return cpu_local(matmul_flops=flops / share, memory_bandwidth=bandwidth / share, gloo_bandwidth=bandwidth / 2)


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def get_cluster(name: str) -> Cluster:
    """A preset by name ('cpu-local' gives the unmeasured defaults); ValueError names the known ones."""
    if name == "cpu-local":
        return cpu_local()
    if name not in CLUSTERS:
        known = ", ".join([*CLUSTERS, "cpu-local"])
        raise ValueError(f"unknown cluster '{name}' (known: {known})")
    return CLUSTERS[name]


def with_efficiency(cluster: Cluster, **changes: float) -> Cluster:
    """A copy of `cluster` with some efficiency fractions replaced (for sensitivity studies)."""
    return dataclasses.replace(cluster, efficiency=dataclasses.replace(cluster.efficiency, **changes))
