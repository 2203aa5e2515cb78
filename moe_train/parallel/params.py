"""Analytic parameter counts of the model and of each pipeline rank's shard (for the dry run).

Assumed architecture (the reference model in moe_train.model): bias-free linear layers, RMSNorm with a
weight only, SwiGLU MLPs (three H x F matrices), a bias-free linear router, q/k RMSNorm when model.qk_norm
(head_dim wide per head, or the full projection width with model.qk_norm_scope=full).

How each component is sharded:

* TP (split over parallel.tp): q/k/v/o projections, dense MLP, shared experts, vocab-parallel
  embedding and output head;
* replicated on the TP ranks of a stage: every RMSNorm and the router;
* routed experts: num_experts / ep experts per rank, each split over etp;
* PP: layers go to virtual stages (even split or parallel.pp_layer_split); pp rank r holds virtual
  stages r, r + pp, ...; the embedding sits on virtual stage 0 (pp rank 0), the final norm and head on
  the last (pp rank pp - 1). With tied embeddings and pp > 1 the last stage holds a copy of the
  embedding (kept equal through the 'embedding' group); the copy is not a unique parameter.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from moe_train.config import ModelConfig, MoEConfig, ParallelConfig
from moe_train.model.counting import qk_norm_parameters


@dataclass(frozen=True)
class ComponentParams:
    """Unsharded parameter counts of each model component."""

    embedding: int
    """Input embedding, V * H."""
    head: int
    """Output projection, V * H (0 when tied to the embedding)."""
    final_norm: int
    """Final RMSNorm, H."""
    attention: int
    """Per layer: q, k, v, o projections."""
    layer_norms: int
    """Per layer: the two pre-norms (+ q/k norms)."""
    dense_mlp: int
    """Per dense layer: SwiGLU, 3 * H * F."""
    router: int
    """Per MoE layer: H * N_E."""
    routed_experts: int
    """Per MoE layer: N_E * 3 * H * F_e."""
    shared_experts: int
    """Per MoE layer: 3 * H * (N_shared * F_s), one fused MLP."""


def component_parameters(model: ModelConfig, moe: MoEConfig) -> ComponentParams:
    """Per-component parameter counts of the model described by `model` and `moe`."""
    h, hd = model.hidden_size, model.head_dim
    shared_ffn = moe.num_shared_experts * (moe.shared_expert_ffn_hidden_size or moe.expert_ffn_hidden_size)
    q_and_o = 2 * h * model.num_heads * hd
    k_and_v = 2 * h * model.num_kv_heads * hd
    return ComponentParams(
        embedding=model.vocab_size * h,
        head=0 if model.tie_embeddings else model.vocab_size * h,
        final_norm=h,
        attention=q_and_o + k_and_v,
        layer_norms=2 * h + qk_norm_parameters(model),
        dense_mlp=3 * h * model.ffn_hidden_size,
        router=h * moe.num_experts,
        routed_experts=moe.num_experts * 3 * h * moe.expert_ffn_hidden_size,
        shared_experts=3 * h * shared_ffn,
    )


def total_parameters(model: ModelConfig, moe: MoEConfig) -> int:
    """Unique parameters of the whole model."""
    c = component_parameters(model, moe)
    num_moe = model.num_layers - moe.first_k_dense
    per_layer = c.attention + c.layer_norms
    moe_extra = c.router + c.routed_experts + c.shared_experts
    return (
        c.embedding
        + c.head
        + c.final_norm
        + model.num_layers * per_layer
        + moe.first_k_dense * c.dense_mlp
        + num_moe * moe_extra
    )


def virtual_stage_layers(num_layers: int, parallel: ParallelConfig) -> list[list[int]]:
    """Global layer indices of each virtual stage (pp * vpp of them, in pipeline order)."""
    stages = parallel.pp * parallel.vpp
    split = parallel.pp_layer_split or [num_layers // stages] * stages
    bounds = [0]
    for n in split:
        bounds.append(bounds[-1] + n)
    return [list(range(a, b)) for a, b in itertools.pairwise(bounds)]


@dataclass(frozen=True)
class RankParams:
    """Parameters held by one rank of pipeline rank `pp_rank` (every rank of a stage holds as many)."""

    pp_rank: int
    layers: list[int]
    """Global indices of the transformer layers on this pp rank."""
    extras: tuple[str, ...]
    """'embedding' and/or 'head' when this stage holds them."""
    tp_sharded: int
    """This rank's share of TP-split parameters (already divided by tp)."""
    replicated: int
    """Non-expert parameters replicated on every TP rank (norms, router)."""
    expert: int
    """This rank's share of routed-expert parameters (already divided by ep * etp)."""
    tied_copy: int
    """This rank's share of a tied-embedding copy on the last stage (not unique)."""

    @property
    def total(self) -> int:
        """All parameters this rank stores."""
        return self.tp_sharded + self.replicated + self.expert + self.tied_copy


def _layers_params(
    layers: list[int], c: ComponentParams, first_k_dense: int, parallel: ParallelConfig
) -> tuple[int, int, int]:
    """(tp-sharded, replicated, expert) per-rank parameters of the given transformer layers."""
    tp, shards = parallel.tp, parallel.ep * parallel.etp
    sharded = replicated = expert = 0
    for layer in layers:
        sharded += c.attention // tp
        replicated += c.layer_norms
        if layer < first_k_dense:
            sharded += c.dense_mlp // tp
        else:
            sharded += c.shared_experts // tp
            replicated += c.router
            expert += c.routed_experts // shards
    return sharded, replicated, expert


def rank_parameters(model: ModelConfig, moe: MoEConfig, parallel: ParallelConfig) -> list[RankParams]:
    """Per-rank parameter counts for each pipeline rank (index = pp rank). Assumes a valid layout."""
    c = component_parameters(model, moe)
    virtual = virtual_stage_layers(model.num_layers, parallel)
    pp, tp = parallel.pp, parallel.tp
    result = []
    for pp_rank in range(pp):
        layers = [layer for v in range(pp_rank, len(virtual), pp) for layer in virtual[v]]
        sharded, replicated, expert = _layers_params(layers, c, moe.first_k_dense, parallel)
        extras: list[str] = []
        tied_copy = 0
        if pp_rank == 0:
            extras.append("embedding")
            sharded += c.embedding // tp
        if pp_rank == pp - 1:
            extras.append("head")
            sharded += c.head // tp
            replicated += c.final_norm
            if model.tie_embeddings and pp > 1:
                tied_copy = c.embedding // tp
        result.append(RankParams(pp_rank, layers, tuple(extras), sharded, replicated, expert, tied_copy))
    return result


def unique_parameters(ranks: list[RankParams], parallel: ParallelConfig) -> int:
    """Sum of the unique shards over all ranks: tp copies of TP shards, ep * etp of expert shards."""
    return sum(rp.tp_sharded * parallel.tp + rp.replicated + rp.expert * parallel.ep * parallel.etp for rp in ranks)


def rank_memory_bytes(rp: RankParams, dp: int, edp: int, zero1: bool) -> tuple[float, float]:
    """(fp32 params + grads, Adam m + v) bytes of one rank; ZeRO-1 divides Adam state by dp (dense)
    and edp (experts), the groups that hold replicas of those parameters."""
    dense = rp.total - rp.expert
    weights_grads = 8.0 * rp.total
    adam = 8.0 * (dense / (dp if zero1 else 1) + rp.expert / (edp if zero1 else 1))
    return weights_grads, adam
