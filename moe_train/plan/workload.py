"""What one rank holds and computes for one micro-batch under a layout: the shared input of the memory
and step-time models.

Legend (per rank, one micro-batch): T tokens in the attention projections (mbs * S / cp, the full
sequence shard after the sequence-parallel all-gather), Ts = T / tp the sequence-parallel shard (what
the norms, the router and the dispatcher see), R = Ts * top_k token copies sent by the dispatcher.
Parameter counts per pipeline rank come from `moe_train.parallel.params.rank_parameters` (the dry
run's own counter) and layer placement from `virtual_stage_layers`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moe_train.config import Config
from moe_train.model.moe.layer import shared_ffn_size
from moe_train.parallel.params import RankParams, rank_parameters, virtual_stage_layers
from moe_train.plan.space import PlanLayout, PlanOptions, layout_config


def payload_bytes_per_row(hidden: int, dtype: str) -> float:
    """Bytes of one dispatched token row: fp32 4H, bf16 2H, fp8 H values + one fp32 scale per 128."""
    if dtype == "fp8":
        return hidden + 4 * -(-hidden // 128)
    return (4 if dtype == "fp32" else 2) * hidden


@dataclass(frozen=True)
class Workload:
    """Model shape, layout sizes and per-rank token counts of one plan."""

    cfg: Config
    layout: PlanLayout
    options: PlanOptions
    world: int
    dp: int
    """Attention data-parallel size, world / (pp * cp * tp)."""
    edp: int
    """Expert data-parallel size, world / (pp * ep * etp)."""
    num_micro: int
    ranks: tuple[RankParams, ...]
    """Parameters of each pipeline rank (index = pp rank)."""
    stages: tuple[tuple[int, ...], ...]
    """Layer ids of each virtual stage, pipeline order (chunk v of pp rank r is stage v * pp + r)."""

    # -- model shape ----------------------------------------------------------------------------
    @property
    def hidden(self) -> int:
        return self.cfg.model.hidden_size

    @property
    def q_dim(self) -> int:
        return self.cfg.model.num_heads * self.cfg.model.head_dim

    @property
    def kv_dim(self) -> int:
        return self.cfg.model.num_kv_heads * self.cfg.model.head_dim

    @property
    def shared_ffn(self) -> int:
        return shared_ffn_size(self.cfg.moe)

    def is_moe(self, layer: int) -> bool:
        """Whether transformer layer `layer` has an MoE FFN (the first moe.first_k_dense are dense)."""
        return layer >= self.cfg.moe.first_k_dense

    # -- tokens ---------------------------------------------------------------------------------
    @property
    def tokens(self) -> float:
        """T: tokens of one micro-batch in this rank's attention projections."""
        return self.layout.micro_batch_size * self.options.seq_len / self.layout.cp

    @property
    def shard_tokens(self) -> float:
        """Ts = T / tp: the sequence-parallel shard."""
        return self.tokens / self.layout.tp

    @property
    def copies(self) -> float:
        """R: token copies this rank dispatches (and, balanced, receives) per MoE layer."""
        return self.shard_tokens * self.cfg.moe.top_k

    def received_rows_max(self) -> float:
        """Rows one rank's experts may receive in one layer (before the ETP gather): the capacity bound,
        else options.expert_load x balanced, else the dropless worst case."""
        moe, ep = self.cfg.moe, self.layout.ep
        worst = ep * self.shard_tokens * min(moe.top_k, moe.num_experts // ep)
        if moe.capacity_factor is not None:
            return min(worst, moe.capacity_factor * self.copies)
        if self.options.expert_load is not None:
            return min(worst, self.options.expert_load * self.copies)
        return worst

    def rank_layers(self, pp_rank: int) -> list[int]:
        """Transformer layers held by `pp_rank` (all its chunks)."""
        pp = self.layout.pp
        return [layer for v in range(pp_rank, len(self.stages), pp) for layer in self.stages[v]]

    def chunk_layers(self, pp_rank: int, chunk: int) -> tuple[int, ...]:
        """Layers of local chunk `chunk` of `pp_rank`."""
        return self.stages[chunk * self.layout.pp + pp_rank]


def build_workload(cfg: Config, layout: PlanLayout, options: PlanOptions, world: int) -> Workload:
    """The Workload of `layout` on `world` ranks (sizes assumed to divide; validity is checked elsewhere)."""
    trial = layout_config(cfg, layout, options)
    dp = world // (layout.pp * layout.cp * layout.tp)
    edp = world // (layout.pp * layout.ep * layout.etp)
    num_micro = options.global_batch_size // (dp * layout.micro_batch_size)
    key = (
        repr(trial.model),
        repr(trial.moe),
        layout.tp,
        layout.pp,
        layout.vpp,
        layout.ep,
        layout.etp,
        layout.pp_layer_split,
    )
    if key not in _PLACEMENT:
        if len(_PLACEMENT) > 4096:
            _PLACEMENT.clear()
        ranks = tuple(rank_parameters(trial.model, trial.moe, trial.parallel))
        stages = tuple(tuple(s) for s in virtual_stage_layers(trial.model.num_layers, trial.parallel))
        _PLACEMENT[key] = (ranks, stages)
    ranks, stages = _PLACEMENT[key]
    return Workload(trial, layout, options, world, dp, edp, num_micro, ranks, stages)


_PLACEMENT: dict[tuple[object, ...], tuple[tuple[RankParams, ...], tuple[tuple[int, ...], ...]]] = {}
"""Parameter counts and layer placement per (model, sizes, split): the search re-uses them across
micro-batch sizes, recompute modes, cp and zero1."""


def with_layout(w: Workload, **changes: object) -> Workload:
    """The same workload with some layout fields replaced (those that leave sizes and stages unchanged)."""
    return dataclasses.replace(w, layout=dataclasses.replace(w.layout, **changes))  # type: ignore[arg-type]
