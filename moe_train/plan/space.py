"""The plan space: one candidate layout (`PlanLayout`), the run options it is judged under (`PlanOptions`),
and validity from the trainer's own rules.

`cp` (`parallel.cp`), `recompute` (`train.recompute`) and `loss_chunk_tokens` (`train.loss_chunk_tokens`)
are the trainer's own keys: read from a config and written back by `layout_config`. `dispatch_dtype` and
`gemm_precision` (FP8 GEMMs, which the published GB200 runs use) are planner dimensions only: the run's
precision sets them.

Meshes (MoE Parallel Folding, arXiv 2504.14960): attention [pp, dp, cp, tp], experts [pp, edp, ep, etp],
so dp = world / (pp * cp * tp) and edp = world / (pp * ep * etp).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from moe_train.config import Config, ConfigError
from moe_train.parallel.layout import Layout, validate_layout

RECOMPUTE_MODES = ("none", "selective", "full")
DISPATCH_DTYPES = ("fp32", "bf16", "fp8")
GEMM_PRECISIONS = ("fp32", "bf16", "fp8")


@dataclass(frozen=True)
class PlanLayout:
    """One point of the plan space."""

    tp: int = 1
    cp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int = 1
    micro_batch_size: int = 1
    recompute: str = "none"
    zero1: bool = False
    pp_layer_split: tuple[int, ...] | None = None
    """Layers per virtual stage (pp * vpp entries); None = an even split."""

    def label(self) -> str:
        """Short human form, e.g. 'tp2 pp8 vpp7 ep8 mbs1 rc:none'."""
        parts = [f"tp{self.tp}"]
        parts += [f"cp{self.cp}"] if self.cp > 1 else []
        parts += [f"pp{self.pp}"] + ([f"vpp{self.vpp}"] if self.vpp > 1 else [])
        parts += [f"ep{self.ep}"] + ([f"etp{self.etp}"] if self.etp > 1 else [])
        parts += [f"mbs{self.micro_batch_size}", f"rc:{self.recompute}"] + (["zero1"] if self.zero1 else [])
        return " ".join(parts)


@dataclass(frozen=True)
class Features:
    """What the training engine overlaps. Defaults describe moe_train's native engine."""

    tp_comm_overlap: bool = False
    """TP all-gather / reduce-scatter overlapped with the adjacent GEMMs (Megatron --tp-comm-overlap)."""
    ep_comm_overlap: bool = False
    """EP all-to-all hidden behind another micro-batch's compute (Megatron 1F1B A2A overlap)."""
    dp_grad_overlap: bool = True
    """Gradient reduction overlapped with the last micro-batch's backward (moe_train's GradReducer does this)."""
    dp_param_overlap: bool = False
    """ZeRO parameter all-gather overlapped with the next step's first forward (Megatron --overlap-param-gather)."""
    pp_p2p_overlap: bool = False
    """Pipeline send / receive overlapped with compute (Megatron, with vpp > 1)."""
    sp_save_sharded: bool = False
    """Sequence-parallel inputs saved sharded and re-gathered in backward (Megatron); moe_train saves the gathered input."""
    dedup_inter_node: bool = False
    """The dispatcher sends a token once per remote domain, not once per expert (DeepEP / HybridEP)."""


@dataclass(frozen=True)
class StateRecipe:
    """Bytes per parameter of the model state, and how ZeRO shards it over the data-parallel groups."""

    name: str
    param_bytes: float
    """Weights as used by the forward (fp32 in moe_train, whose bf16 is autocast)."""
    grad_bytes: float
    grad_buffer_bytes: float
    """A second gradient copy (flat communication buckets), where the engine keeps one."""
    master_bytes: float
    """An fp32 master copy of the weights (mixed-precision engines), 0 when the weights are the master."""
    optim_bytes: float
    """Adam moments (8 fp32, 4 bf16)."""
    shard_optimizer: bool
    """Adam moments and master copy sharded over dp (dense) / edp (experts): ZeRO-1 / distributed optimizer."""
    shard_grads: bool = False
    """Gradients sharded too (ZeRO-2)."""
    offload_optimizer: bool = False
    """Adam moments and master copy live in host memory."""
    grad_sync: str = "allreduce"
    """'allreduce' (+ all-gather of updated shards under ZeRO) or 'reduce_scatter' (+ all-gather)."""
    gather_bytes: float = 4.0
    """Bytes per parameter of the post-step all-gather under a sharded optimizer."""


def native_recipe(zero1: bool) -> StateRecipe:
    """moe_train's engine: fp32 weights and grads, a flat fp32 bucket copy of the grads, fp32 Adam."""
    return StateRecipe("native", 4, 4, 4, 0, 8, shard_optimizer=zero1)


def deepspeed_recipe(stage: int, offload: bool) -> StateRecipe:
    """DeepSpeed ZeRO-1/2 on fp32 weights: an fp32 partition copy of the weights, Adam on the partition."""
    return StateRecipe(
        f"deepspeed-zero{stage}",
        4,
        4,
        0,
        4,
        8,
        shard_optimizer=True,
        shard_grads=stage == 2,
        offload_optimizer=offload,
        grad_sync="reduce_scatter",
    )


def megatron_recipe(optim_bytes: float = 8, offload: bool = False, gather_bytes: float = 2) -> StateRecipe:
    """Megatron-Core's distributed optimizer: bf16 weights, fp32 main grads, sharded fp32 master + Adam."""
    return StateRecipe(
        "megatron",
        2,
        4,
        0,
        4,
        optim_bytes,
        shard_optimizer=True,
        offload_optimizer=offload,
        grad_sync="reduce_scatter",
        gather_bytes=gather_bytes,
    )


@dataclass(frozen=True)
class PlanOptions:
    """What a plan is judged under, and the choices the search may make."""

    seq_len: int
    global_batch_size: int
    activation_bytes: float = 2.0
    """Bytes per activation element (2 under bf16 autocast, 4 in fp32)."""
    gemm_precision: str = "bf16"
    dispatch_dtype: str = "bf16"
    loss_chunk_tokens: int = 0
    """0: the whole [tokens, vocab / tp] logits are materialised; else the loss runs in chunks of this many tokens."""
    expert_load: float | None = None
    """Max / mean tokens per expert assumed for memory; None = the dropless worst case (every token of the
    EP group routed to this rank's experts). 1.0 describes forced balance. Ignored under a capacity factor."""
    features: Features = field(default_factory=Features)
    recipe: StateRecipe | None = None
    """None = from the config's engine (native / deepspeed) and the layout's zero1."""
    cp_comm: str = "ring"
    """Context parallel K/V exchange: 'ring' (P2P, overlapped with attention) or 'allgather' (what the
    trainer builds; `moe-train plan` sets it when the config has parallel.cp)."""
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    recompute_modes: tuple[str, ...] = RECOMPUTE_MODES
    cp_sizes: tuple[int, ...] = (1,)
    """Context-parallel sizes searched; the CLI widens this only when the trainer has parallel.cp (issue 14)."""
    max_vpp: int = 8


def options_from_config(cfg: Config, **overrides: typing.Any) -> PlanOptions:
    """PlanOptions for `cfg` (its seq_len, batch, precision), with any field overridden."""
    t = cfg.train
    base: dict[str, typing.Any] = {
        "seq_len": t.seq_len,
        "global_batch_size": t.global_batch_size,
        "activation_bytes": 2.0 if t.precision == "bf16" else 4.0,
        "gemm_precision": "bf16" if t.precision == "bf16" else "fp32",
        "dispatch_dtype": "bf16" if t.precision == "bf16" else "fp32",
        "loss_chunk_tokens": t.loss_chunk_tokens,
    }
    base.update(overrides)
    return PlanOptions(**base)


def layout_from_config(cfg: Config) -> PlanLayout:
    """The PlanLayout a config already describes."""
    p = cfg.parallel
    split = tuple(p.pp_layer_split) if p.pp_layer_split is not None else None
    return PlanLayout(
        tp=p.tp,
        cp=p.cp,
        pp=p.pp,
        vpp=p.vpp,
        ep=p.ep,
        etp=p.etp,
        micro_batch_size=cfg.train.micro_batch_size,
        zero1=p.zero1,
        pp_layer_split=split,
        recompute=cfg.train.recompute,
    )


def recipe_for(cfg: Config, layout: PlanLayout, options: PlanOptions) -> StateRecipe:
    """The model-state recipe: options.recipe if given, else the config's engine."""
    if options.recipe is not None:
        return options.recipe
    if cfg.engine.name == "deepspeed":
        from moe_train.engine_config import load_deepspeed_config

        ds = load_deepspeed_config(cfg.engine.deepspeed_config)
        zero = ds.get("zero_optimization", {})
        return deepspeed_recipe(int(zero.get("stage", 1)), "offload_optimizer" in zero)
    return native_recipe(layout.zero1)


# ---------------------------------------------------------------------------------------------
# Validity


def balanced_split(num_layers: int, stages: int) -> tuple[int, ...] | None:
    """Layers per virtual stage as even as possible; the first and last stages (embedding, head) get
    the smaller counts. None when the layers divide evenly (no split needed) or there are too few."""
    if num_layers % stages == 0 or num_layers < stages:
        return None
    base, extra = divmod(num_layers, stages)
    counts = [base] * stages
    order = list(range(1, stages - 1)) + [0, stages - 1]
    for i in order[:extra]:
        counts[i] += 1
    return tuple(counts)


def tail_split(num_layers: int, stages: int) -> tuple[int, ...] | None:
    """Every virtual stage gets ceil(L / S) layers but the last, which holds the rest (it also runs the
    head and the loss): DeepSeek-V3's published 'Et*4|(tttt|)*14tmL'. None when that is not a real split."""
    full = -(-num_layers // stages)
    last = num_layers - (stages - 1) * full
    if stages < 2 or not 1 <= last < full:
        return None
    return (*[full] * (stages - 1), last)


def layout_config(cfg: Config, layout: PlanLayout, options: PlanOptions) -> Config:
    """`cfg` with the layout's parallel keys, micro-batch size, recompute, seq_len, global batch and loss
    chunking applied."""
    p = dataclasses.replace(
        cfg.parallel,
        tp=layout.tp,
        cp=layout.cp,
        pp=layout.pp,
        vpp=layout.vpp,
        ep=layout.ep,
        etp=layout.etp,
        zero1=layout.zero1 and cfg.engine.name == "native",
        pp_schedule="interleaved_1f1b" if layout.vpp > 1 else "1f1b",
        pp_layer_split=list(layout.pp_layer_split) if layout.pp_layer_split else None,
    )
    t = dataclasses.replace(
        cfg.train,
        micro_batch_size=layout.micro_batch_size,
        seq_len=options.seq_len,
        global_batch_size=options.global_batch_size,
        recompute=layout.recompute,
        loss_chunk_tokens=options.loss_chunk_tokens,
    )
    return dataclasses.replace(cfg, parallel=p, train=t)


def check_context_parallel(cfg: Config, layout: PlanLayout, world_size: int) -> None:
    """The context-parallel rules (the trainer's `validate_layout` checks the same since parallel.cp
    exists): the sequence splits into 2 * cp load-balanced chunks, each chunk's tokens split over tp,
    and cp * tp * pp divides the world."""
    cp, tp, pp, seq = layout.cp, layout.tp, layout.pp, cfg.train.seq_len
    if cp < 1:
        raise ConfigError(f"parallel.cp ({cp}) must be >= 1")
    if cp == 1:
        return
    if seq % (2 * cp) or (seq // cp) % tp:
        raise ConfigError(
            f"train.seq_len ({seq}) must be divisible by 2 * parallel.cp ({2 * cp}) and its cp chunk by parallel.tp ({tp})"
        )
    if world_size % (cp * tp * pp):
        raise ConfigError(
            f"world size ({world_size}) is not divisible by parallel.cp ({cp}) * parallel.tp ({tp}) * parallel.pp ({pp})"
        )


def validate_plan_layout(cfg: Config, layout: PlanLayout, options: PlanOptions, world_size: int) -> Layout:
    """Raise ConfigError unless `layout` can run `cfg` on `world_size` ranks; returns the trainer's Layout.

    The trainer's own `validate_layout` on the layout's config (it knows parallel.cp: dp = world /
    (tp * cp * pp), seq_len divisible by 2 * cp); `check_context_parallel` first, for its planner wording.
    """
    trial = layout_config(cfg, layout, options)
    check_context_parallel(trial, layout, world_size)
    return validate_layout(trial, world_size)
