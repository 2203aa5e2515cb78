"""Published MoE training runs the planner is validated against (docs/planner.md).

Each run: the model preset, the cluster, the published layout and what that run enabled (as `PlanOptions`
/ `Features` / a Megatron-Core state recipe), and the published throughput. The efficiency constants
come from the cluster preset (`GPU_EFFICIENCY`), the same for every run.

Sources:
* MoE Parallel Folding (arXiv 2504.14960): 49.3% MFU Mixtral-8x22B on 128 H100, 39.0% MFU
  Qwen2-57B-A14B on 64 H100. The layouts are the authors' benchmark configurations in
  github.com/yanring/Megatron-MoE-ModelZoo (runtime_configs/benchmarking/runtime.conf: Mixtral-8x22B
  TP2 PP8 EP8 VPP7 MBS1 GBS256 on 16 nodes, Qwen2-57B-A14B TP2 PP4 EP4 VPP7 MBS1 GBS256 on 8 nodes,
  expert-tensor-parallel 1, sequence length 4096, bf16, --tp-comm-overlap, distributed optimizer with
  overlapped grad reduce / param gather).
* Megatron-Core MoE report (arXiv 2603.07685, Table 11) and its reproduction scripts
  (Megatron-MoE-ModelZoo best_practice/): DeepSeek-V3 on 256 GB200, MXFP8, TP1 PP4 VPP4 EP64,
  MBS1 GBS8192, pipeline layout "Et*4|(tttt|)*14tmL", optimizer states offloaded, forced balance,
  HybridEP: 1,048 TFLOP/s per GPU. Qwen3-235B-A22B on 256 GB200, MXFP8, TP1 PP4 VPP6 EP64, MBS3
  GBS3072, 1F1B all-to-all overlap, forced balance, HybridEP: 919 TFLOP/s per GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe_train.config import Config, load_config
from moe_train.plan.cluster import Cluster, get_cluster
from moe_train.plan.search import Candidate, evaluate, search
from moe_train.plan.space import Features, PlanLayout, PlanOptions, megatron_recipe

PRESETS = Path(__file__).resolve().parent.parent.parent / "configs" / "presets"

MEGATRON_FEATURES = Features(
    tp_comm_overlap=True,
    ep_comm_overlap=False,
    dp_grad_overlap=True,
    dp_param_overlap=True,
    pp_p2p_overlap=True,
    sp_save_sharded=True,
)


@dataclass(frozen=True)
class PublishedRun:
    """One published run and how to reproduce its setting in the planner."""

    name: str
    preset: str
    cluster: str
    world: int
    layout: PlanLayout
    options: PlanOptions
    published_tflops: float
    source: str

    def config(self) -> Config:
        return load_config(PRESETS / f"{self.preset}.yaml")

    def get_cluster(self) -> Cluster:
        return get_cluster(self.cluster)

    @property
    def published_mfu(self) -> float:
        """Published TFLOP/s per GPU over the cluster's dense bf16 peak."""
        return self.published_tflops * 1e12 / self.get_cluster().peak_flops_bf16


def _h100(seq: int, batch: int) -> PlanOptions:
    return PlanOptions(
        seq_len=seq,
        global_batch_size=batch,
        expert_load=1.0,
        features=MEGATRON_FEATURES,
        recipe=megatron_recipe(),
    )


def _gb200(batch: int, ep_overlap: bool, offload: bool, gather_bytes: float) -> PlanOptions:
    return PlanOptions(
        seq_len=4096,
        global_batch_size=batch,
        gemm_precision="fp8",
        dispatch_dtype="fp8",
        expert_load=1.0,
        features=Features(
            tp_comm_overlap=True,
            ep_comm_overlap=ep_overlap,
            dp_grad_overlap=True,
            dp_param_overlap=True,
            pp_p2p_overlap=True,
            sp_save_sharded=True,
        ),
        recipe=megatron_recipe(optim_bytes=4, offload=offload, gather_bytes=gather_bytes),
    )


PUBLISHED_RUNS: tuple[PublishedRun, ...] = (
    PublishedRun(
        "Mixtral-8x22B, 128 H100",
        "mixtral_8x22b",
        "h100-ib",
        128,
        PlanLayout(tp=2, pp=8, vpp=7, ep=8, etp=1, micro_batch_size=1),
        _h100(4096, 256),
        0.493 * 989,
        "arXiv 2504.14960 (49.3% MFU)",
    ),
    PublishedRun(
        "Qwen2-57B-A14B, 64 H100",
        "qwen2_57b_a14b",
        "h100-ib",
        64,
        PlanLayout(tp=2, pp=4, vpp=7, ep=4, etp=1, micro_batch_size=1),
        _h100(4096, 256),
        0.390 * 989,
        "arXiv 2504.14960 (39.0% MFU)",
    ),
    PublishedRun(
        "DeepSeek-V3, 256 GB200",
        "deepseek_v3_standin",
        "gb200-nvl72",
        256,
        PlanLayout(tp=1, pp=4, vpp=4, ep=64, etp=1, micro_batch_size=1, pp_layer_split=(4, *[4] * 14, 1)),
        _gb200(8192, ep_overlap=False, offload=True, gather_bytes=1),
        1048.0,
        "arXiv 2603.07685 Table 11 (1,048 TFLOP/s)",
    ),
    PublishedRun(
        "Qwen3-235B-A22B, 256 GB200",
        "qwen3_235b_a22b",
        "gb200-nvl72",
        256,
        PlanLayout(tp=1, pp=4, vpp=6, ep=64, etp=1, micro_batch_size=3, pp_layer_split=(3, *[4] * 22, 3)),
        _gb200(3072, ep_overlap=True, offload=False, gather_bytes=1),
        919.0,
        "arXiv 2603.07685 Table 11 (919 TFLOP/s)",
    ),
)


@dataclass(frozen=True)
class Validation:
    """The planner's prediction of one published run, and its own choice for the same model and GPUs."""

    run: PublishedRun
    predicted: Candidate
    choice: Candidate | None

    @property
    def predicted_mfu(self) -> float:
        assert self.predicted.time is not None  # evaluate() always times a published layout
        return self.predicted.time.mfu

    @property
    def relative_error(self) -> float:
        return self.predicted_mfu / self.run.published_mfu - 1.0


def validate_run(run: PublishedRun, search_choice: bool = True) -> Validation:
    """Predict the published layout; optionally search the same plan space for the planner's own choice."""
    cfg, cluster = run.config(), run.get_cluster()
    predicted = evaluate(cfg, run.layout, run.options, run.world, cluster)
    choice = None
    if search_choice:
        best, _ = search(cfg, run.world, cluster, run.options, top=1)
        choice = best[0] if best else None
    return Validation(run, predicted, choice)
