"""Rank layout (MoE Parallel Folding), layout validation and the dry-run report.

Everything here is pure Python: no process group, no tensors. A 1,024-rank layout is derived and
checked on one machine in milliseconds.

Two meshes share the same ranks (Megatron-Core *MoE Parallel Folding*, arXiv 2504.14960):

* attention / dense side: ``[pp, dp, cp, tp]`` with tp fastest, ``dp = world / (tp * cp * pp)``;
* expert side: ``[pp, edp, ep, etp]`` with etp fastest, ``edp = world / (etp * ep * pp)``.

pp is the outermost dimension of both, so a pipeline stage is the same set of ranks on both sides;
inside a stage the expert mesh is "folded" over the attention mesh, and an EP group may span
attention-TP and attention-DP ranks.

Rank formulas, with ``S = world / pp`` ranks per stage and ``r = rank % S``:
``pp_rank = rank // S``, ``dp_rank = r // (cp * tp)``, ``cp_rank = (r // tp) % cp``, ``tp_rank = r % tp``,
``edp_rank = r // (ep * etp)``, ``ep_rank = (r // etp) % ep``, ``etp_rank = r % etp``.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from moe_train.config import Config, ConfigError, ParallelConfig
from moe_train.parallel.params import RankParams, rank_memory_bytes, rank_parameters, total_parameters

logger = logging.getLogger(__name__)

GROUP_KINDS: tuple[str, ...] = (
    "tp",
    "cp",
    "tp_cp",
    "pp",
    "dp",
    "dp_cp",
    "ep",
    "etp",
    "edp",
    "stage",
    "lbl",
    "mixture",
    "grad_norm",
    "embedding",
)
"""Every process-group kind, in the order groups are created (identical on all ranks).

* ``tp``, ``cp``, ``pp``, ``dp``: attention-side tensor / context / pipeline / data parallel groups.
* ``tp_cp``: tensor x context parallel: the ranks holding token shards of the same micro-batch (the
  sequence-parallel and context-parallel shards); router statistics are summed here.
* ``dp_cp``: data x context parallel: dense gradients are summed here (cp ranks hold different
  tokens of the same sequences); equal to ``dp`` when cp == 1.
* ``ep``, ``etp``, ``edp``: expert-side expert / expert-tensor / expert-data parallel groups.
  Dense gradients are all-reduced over ``dp``, expert gradients over ``edp``.
* ``stage``: all ranks of one pipeline stage (= tp x dp = edp x ep x etp); the token dispatcher's
  all-to-all world.
* ``lbl``: where the global-batch load-balancing loss sums per-expert token counts. It is the
  ``stage`` group: the counts of a layer must cover every token of the global batch that reaches that
  layer, and only ranks of the same stage hold the same layers. DP ranks see different sequences, and
  under sequence parallelism (always on when tp > 1) the tokens entering the router are split along
  the sequence over the TP ranks, so TP ranks see different tokens too (and CP ranks other chunks
  of the sequences). All must be summed; PP ranks must not (other layers). Micro-batch-scope LBL with
  tp * cp > 1 sums over ``tp_cp`` only (the SP / CP shards of one micro-batch).
* ``mixture``: where the mixture sampler sums per-domain losses: the world. Losses exist on the last
  stage and are equal on the TP and CP ranks of a DP replica (vocab-parallel cross entropy, the CP
  token losses all-gathered), so only ranks with ``is_last_stage and tp_rank == cp_rank == 0`` contribute non-zero values; one all-reduce over the world
  then gives every rank (all stages) the same sums, so every rank's sampler takes the same update.
* ``grad_norm``: the world; each rank adds the squared norms of the parameters it owns once
  (replicated parameters only from tp_rank 0 / one DP replica).
* ``embedding``: first and last stage ranks with the same in-stage position; tied embeddings with
  pp > 1 all-reduce their gradient here. Middle-stage ranks (and every rank when pp == 1) are alone
  in theirs, so that this kind too partitions the world.
"""


@dataclass(frozen=True)
class RankCoords:
    """One rank's coordinates on the attention mesh [pp, dp, cp, tp] and expert mesh [pp, edp, ep, etp]."""

    rank: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    cp_rank: int
    edp_rank: int
    ep_rank: int
    etp_rank: int


@dataclass(frozen=True)
class Layout:
    """Sizes of every parallel dimension and, per group kind, the list of rank lists (a partition)."""

    world_size: int
    tp: int
    pp: int
    dp: int
    ep: int
    etp: int
    edp: int
    vpp: int
    groups: dict[str, list[list[int]]]
    """Group kind (see GROUP_KINDS) -> its groups; each kind's groups partition range(world_size)."""
    cp: int = 1
    """Context-parallel size (attention mesh [pp, dp, cp, tp])."""

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage (world / pp)."""
        return self.world_size // self.pp

    def coords(self, rank: int) -> RankCoords:
        """Coordinates of `rank` on both meshes."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world size ({self.world_size}))")
        r = rank % self.stage_size
        return RankCoords(
            rank=rank,
            pp_rank=rank // self.stage_size,
            dp_rank=r // (self.cp * self.tp),
            tp_rank=r % self.tp,
            cp_rank=(r // self.tp) % self.cp,
            edp_rank=r // (self.ep * self.etp),
            ep_rank=(r // self.etp) % self.ep,
            etp_rank=r % self.etp,
        )

    def group_of(self, kind: str, rank: int) -> list[int]:
        """The ranks of the `kind` group that contains `rank`."""
        for ranks in self.groups[kind]:
            if rank in ranks:
                return ranks
        raise ValueError(f"rank ({rank}) is in no '{kind}' group of world size {self.world_size}")


def _mesh_groups(shape: tuple[int, ...], vary: tuple[int, ...]) -> list[list[int]]:
    """Groups of a row-major mesh whose ranks differ only along the dimensions in `vary`."""
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    fixed = [d for d in range(len(shape)) if d not in vary]
    groups = []
    for fixed_idx in itertools.product(*(range(shape[d]) for d in fixed)):
        base = sum(i * strides[d] for i, d in zip(fixed_idx, fixed, strict=True))
        members = itertools.product(*(range(shape[d]) for d in vary))
        groups.append(sorted(base + sum(i * strides[d] for i, d in zip(idx, vary, strict=True)) for idx in members))
    return groups


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_world(world_size: int, p: ParallelConfig) -> None:
    """The divisibility checks that a rank layout needs."""
    _require(world_size >= 1, f"world size ({world_size}) must be >= 1")
    for key in ("tp", "cp", "pp", "vpp", "ep", "etp"):
        value = getattr(p, key)
        _require(value >= 1, f"parallel.{key} ({value}) must be >= 1")
    cp_term = f" * parallel.cp ({p.cp})" if p.cp > 1 else ""
    _require(
        world_size % (p.tp * p.cp * p.pp) == 0,
        f"world size ({world_size}) is not divisible by parallel.tp ({p.tp}){cp_term} * parallel.pp ({p.pp})",
    )
    _require(
        world_size % (p.etp * p.ep * p.pp) == 0,
        f"world size ({world_size}) is not divisible by parallel.etp ({p.etp}) * parallel.ep ({p.ep})"
        f" * parallel.pp ({p.pp})",
    )


def rank_layout(world_size: int, parallel_cfg: ParallelConfig) -> Layout:
    """Derive dp, edp and every group kind's rank lists; raises ConfigError if the sizes do not fit."""
    p = parallel_cfg
    _check_world(world_size, p)
    dp = world_size // (p.tp * p.cp * p.pp)
    edp = world_size // (p.etp * p.ep * p.pp)
    attn = (p.pp, dp, p.cp, p.tp)
    expert = (p.pp, edp, p.ep, p.etp)
    stage = _mesh_groups(attn, (1, 2, 3))
    groups = {
        "tp": _mesh_groups(attn, (3,)),
        "cp": _mesh_groups(attn, (2,)),
        "tp_cp": _mesh_groups(attn, (2, 3)),
        "pp": _mesh_groups(attn, (0,)),
        "dp": _mesh_groups(attn, (1,)),
        "dp_cp": _mesh_groups(attn, (1, 2)),
        "ep": _mesh_groups(expert, (2,)),
        "etp": _mesh_groups(expert, (3,)),
        "edp": _mesh_groups(expert, (1,)),
        "stage": stage,
        "lbl": [list(g) for g in stage],
        "mixture": [list(range(world_size))],
        "grad_norm": [list(range(world_size))],
        "embedding": _embedding_groups(world_size, p.pp),
    }
    return Layout(world_size, p.tp, p.pp, dp, p.ep, p.etp, edp, p.vpp, groups, p.cp)


def _embedding_groups(world_size: int, pp: int) -> list[list[int]]:
    """[first-stage rank, last-stage rank] pairs at the same in-stage position; every other rank alone."""
    stage_size = world_size // pp
    if pp == 1:
        return [[r] for r in range(world_size)]
    pairs = [[s, (pp - 1) * stage_size + s] for s in range(stage_size)]
    middle = [[r] for r in range(stage_size, (pp - 1) * stage_size)]
    return pairs + middle


# ---------------------------------------------------------------------------------------------
# Validation


def _check_divisible(value: int, value_key: str, by: int, by_key: str) -> None:
    _require(value % by == 0, f"{value_key} ({value}) is not divisible by {by_key} ({by})")


def _check_tensor_parallel(cfg: Config) -> None:
    """Every dimension that TP / SP / ETP shard must split evenly."""
    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    _check_divisible(moe.num_experts, "moe.num_experts", p.ep, "parallel.ep")
    for key in ("num_heads", "num_kv_heads", "hidden_size", "ffn_hidden_size", "vocab_size"):
        _check_divisible(getattr(m, key), f"model.{key}", p.tp, "parallel.tp")
    if moe.num_shared_experts > 0:  # the shared experts form one fused TP-split MLP
        per_expert = moe.shared_expert_ffn_hidden_size or moe.expert_ffn_hidden_size
        fused = moe.num_shared_experts * per_expert
        _require(
            fused % p.tp == 0,
            f"moe.num_shared_experts ({moe.num_shared_experts}) * shared expert ffn size ({per_expert})"
            f" = {fused} is not divisible by parallel.tp ({p.tp})",
        )
    _check_divisible(moe.expert_ffn_hidden_size, "moe.expert_ffn_hidden_size", p.etp, "parallel.etp")
    _check_divisible(cfg.train.seq_len, "train.seq_len (sequence parallel)", p.tp, "parallel.tp")
    _check_context_parallel(cfg)


def _check_context_parallel(cfg: Config) -> None:
    """Load-balanced causal chunks: 2 * cp equal chunks per sequence, each rank's pair split by tp."""
    p, seq_len = cfg.parallel, cfg.train.seq_len
    if p.cp == 1:
        return
    _require(
        seq_len % (2 * p.cp) == 0,
        f"train.seq_len ({seq_len}) is not divisible by 2 * parallel.cp ({2 * p.cp}): context parallelism"
        " splits each sequence into 2 * cp equal chunks",
    )
    _require(
        (seq_len // p.cp) % p.tp == 0,
        f"train.seq_len / parallel.cp ({seq_len // p.cp}) is not divisible by parallel.tp ({p.tp})"
        " (sequence parallelism splits each context-parallel shard)",
    )
    _require(
        cfg.engine.name != "deepspeed",
        f"parallel.cp ({p.cp}) > 1 is not supported with engine.name 'deepspeed' (use the native engine)",
    )


def check_layer_split(cfg: Config) -> None:
    """Layers per virtual stage: an even split, or parallel.pp_layer_split (every entry >= 1)."""
    p, num_layers = cfg.parallel, cfg.model.num_layers
    stages = p.pp * p.vpp
    split = p.pp_layer_split
    if split is None:
        _require(
            num_layers % stages == 0,
            f"model.num_layers ({num_layers}) is not divisible by parallel.pp ({p.pp}) * parallel.vpp"
            f" ({p.vpp}); set parallel.pp_layer_split for an uneven split",
        )
        return
    _require(
        len(split) == stages,
        f"parallel.pp_layer_split ({split}) has {len(split)} entries, expected parallel.pp ({p.pp})"
        f" * parallel.vpp ({p.vpp}) = {stages}",
    )
    _require(
        sum(split) == num_layers,
        f"parallel.pp_layer_split ({split}) sums to {sum(split)}, expected model.num_layers ({num_layers})",
    )
    _require(min(split) >= 1, f"parallel.pp_layer_split ({split}) has a stage with < 1 layer")


def _check_schedule(cfg: Config, dp: int) -> None:
    """Batch split into micro-batches and the pipeline schedule's needs."""
    p, t = cfg.parallel, cfg.train
    per_step = dp * t.micro_batch_size
    _require(
        t.global_batch_size % per_step == 0,
        f"train.global_batch_size ({t.global_batch_size}) is not divisible by dp ({dp})"
        f" * train.micro_batch_size ({t.micro_batch_size}) = {per_step}",
    )
    if p.vpp > 1:
        _require(p.pp > 1, f"parallel.vpp ({p.vpp}) > 1 needs parallel.pp > 1 (got {p.pp})")
        _require(
            p.pp_schedule == "interleaved_1f1b",
            f"parallel.vpp ({p.vpp}) > 1 needs parallel.pp_schedule 'interleaved_1f1b' (got '{p.pp_schedule}')",
        )
    if p.pp_schedule == "interleaved_1f1b":
        _require(p.vpp > 1, f"parallel.pp_schedule 'interleaved_1f1b' needs parallel.vpp > 1 (got {p.vpp})")
    _check_micro_batches(cfg, t.global_batch_size // per_step)


def _check_micro_batches(cfg: Config, num_micro: int) -> None:
    """Interleaved 1F1B runs micro-batches in rounds of pp: error. Plain 1F1B with fewer than pp
    micro-batches is still correct, only mostly bubble: warning."""
    p = cfg.parallel
    if p.pp == 1:
        return
    if p.pp_schedule == "interleaved_1f1b":
        _require(
            num_micro % p.pp == 0,
            f"micro-batches per step ({num_micro} = train.global_batch_size / (dp * train.micro_batch_size))"
            f" must be a multiple of parallel.pp ({p.pp}) for 'interleaved_1f1b'",
        )
    elif num_micro < p.pp:
        logger.warning(
            "micro-batches per step (%d) < parallel.pp (%d): 1F1B never reaches steady state (bubble %.0f%%)",
            num_micro,
            p.pp,
            100.0 * bubble_fraction(p.pp, num_micro, 1),
        )


def bubble_fraction(pp: int, num_micro: int, vpp: int) -> float:
    """Idle fraction of a (interleaved) 1F1B step: (pp - 1) / (vpp * m + pp - 1)."""
    return (pp - 1) / (vpp * num_micro + pp - 1)


def validate_layout(cfg: Config, world_size: int) -> Layout:
    """Check that `cfg` can run on `world_size` ranks; returns the layout, raises ConfigError (one line).

    Inefficient but correct settings (1F1B with fewer micro-batches than stages) only log a warning.
    """
    layout = rank_layout(world_size, cfg.parallel)
    _check_tensor_parallel(cfg)
    check_layer_split(cfg)
    _require(
        not (cfg.model.tie_embeddings and cfg.parallel.pp > 1),
        f"model.tie_embeddings (true) is not supported with parallel.pp ({cfg.parallel.pp}) > 1 yet",
    )
    _check_schedule(cfg, layout.dp)
    if cfg.engine.name == "deepspeed":  # the ds_config's gradient_accumulation_steps against this world
        from moe_train.engine_config import deepspeed_config_for

        deepspeed_config_for(cfg, layout.dp)
    return layout


# ---------------------------------------------------------------------------------------------
# Dry run

_GIB = 1024**3


def _format_groups(kind: str, groups: list[list[int]], max_shown: int) -> str:
    shown = " ".join(_format_ranks(g) for g in groups[:max_shown])
    more = f" ... (+{len(groups) - max_shown} more)" if len(groups) > max_shown else ""
    sizes = "|".join(str(n) for n in sorted({len(g) for g in groups}, reverse=True))
    return f"  {kind:<10} {len(groups):>5} x {sizes:<5} {shown}{more}"


def _format_ranks(ranks: list[int], max_ranks: int = 8) -> str:
    if len(ranks) <= max_ranks:
        return "[" + ", ".join(map(str, ranks)) + "]"
    head = ", ".join(map(str, ranks[:4]))
    return f"[{head}, ... {ranks[-1]}]"


def _format_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _layout_lines(cfg: Config, layout: Layout) -> list[str]:
    t, p = cfg.train, cfg.parallel
    num_micro = t.global_batch_size // (layout.dp * t.micro_batch_size)
    cp_dim = f" cp {layout.cp}," if layout.cp > 1 else ""
    lines = [
        f"world {layout.world_size}: attention [pp {layout.pp}, dp {layout.dp},{cp_dim} tp {layout.tp}]"
        f" | experts [pp {layout.pp}, edp {layout.edp}, ep {layout.ep}, etp {layout.etp}] | vpp {layout.vpp}",
        f"batch: global {t.global_batch_size} = dp {layout.dp} x micro {t.micro_batch_size}"
        f" x {num_micro} micro-batches; schedule {p.pp_schedule}"
        f", bubble {100 * bubble_fraction(layout.pp, num_micro, layout.vpp):.1f}%",
    ]
    if layout.cp > 1:
        lines.append(_context_parallel_line(cfg, layout))
    max_shown = 8 if layout.world_size <= 64 else 3
    lines.append("process groups (kind, count x size, ranks):")
    lines += [_format_groups(kind, layout.groups[kind], max_shown) for kind in GROUP_KINDS]
    return lines


def _context_parallel_line(cfg: Config, layout: Layout) -> str:
    """Tokens per rank and the K/V all-gather of one attention layer per micro-batch (fp32 numbers)."""
    m, t = cfg.model, cfg.train
    local = t.seq_len // layout.cp
    kv_heads = m.num_kv_heads // layout.tp
    gathered = 2 * t.micro_batch_size * t.seq_len * kv_heads * m.head_dim * 4  # K and V, whole sequence
    received = gathered * (layout.cp - 1) / layout.cp
    return (
        f"context parallel: cp {layout.cp}, {local} of {t.seq_len} tokens per sequence on each rank (chunks i and"
        f" {2 * layout.cp - 1}-i of {2 * layout.cp}); block activations / {layout.cp} plus the gathered K/V;"
        f" K/V all-gather per layer and micro-batch: receives {received / 2**20:.2f} MiB (fp32), backward"
        " reduce-scatters as much"
    )


def _memory_line(rp: RankParams, layout: Layout, zero1: bool) -> tuple[float, str]:
    weights_grads, adam = rank_memory_bytes(rp, layout.dp * layout.cp, layout.edp, zero1)
    total = weights_grads + adam
    extras = "".join(f" +{name}" for name in rp.extras)
    line = (
        f"  pp rank {rp.pp_rank}: layers {_format_layers(rp.layers)}{extras}; params {_format_count(rp.total)}"
        f" (dense {_format_count(rp.total - rp.expert)}, expert {_format_count(rp.expert)});"
        f" params+grads {weights_grads / _GIB:.3f} GiB, adam {adam / _GIB:.3f} GiB, total {total / _GIB:.3f} GiB"
    )
    return total, line


def _format_layers(layers: list[int]) -> str:
    """[0, 1, 2, 6, 7] -> '0-2,6-7'."""
    if not layers:
        return "none"
    runs = []
    start = prev = layers[0]
    for cur in layers[1:]:
        if cur != prev + 1:
            runs.append((start, prev))
            start = cur
        prev = cur
    runs.append((start, prev))
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _memory_lines(cfg: Config, layout: Layout) -> list[str]:
    per_rank = rank_parameters(cfg.model, cfg.moe, cfg.parallel)
    zero1 = cfg.parallel.zero1
    lines = [
        f"per-rank memory (fp32 params + grads + Adam m,v, no activations; zero1 {'on: Adam / dp x cp (dense), / edp (experts)' if zero1 else 'off'}):"
    ]
    scored = [_memory_line(rp, layout, zero1) for rp in per_rank]
    shown = scored if len(scored) <= 8 else scored[:2] + scored[-2:]
    lines += [line for _, line in shown]
    worst = max(range(len(scored)), key=lambda i: scored[i][0])
    lines.append(f"most loaded rank: pp rank {worst}, {scored[worst][0] / _GIB:.3f} GiB")
    total = total_parameters(cfg.model, cfg.moe)
    lines.append(f"model parameters: {_format_count(total)} ({total})")
    return lines


def dry_run_report(cfg: Config, world_size: int) -> str:
    """Validate the layout and describe it: process groups and per-rank parameter / optimizer memory.

    Pure arithmetic from the config; needs no process group, so a 1,024-rank layout is checked on a
    laptop. Activations are not included.
    """
    layout = validate_layout(cfg, world_size)
    return "\n".join(_layout_lines(cfg, layout) + _memory_lines(cfg, layout))
