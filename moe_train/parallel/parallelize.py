"""`parallelize(model, groups, cfg)`: the one place where parallelism is applied to the single-device model.

Order (torchtitan style): tensor + sequence parallel → expert (+ expert-tensor) parallel → context
parallel (sequence chunks, K/V all-gather, dense grads over dp x cp) → the load-balancing count
reduction over the ``lbl`` group → pipeline stages → activation recompute and the chunked loss →
data-parallel gradient reduction. Every piece slices the model it is given: the trainer gives it the
model on the meta device and materialises each rank's shards afterwards
(moe_train.parallel.materialize), from an initialiser whose values do not depend on the layout, so each
shard starts from exactly the single-device values.
Each piece is skipped when its size is 1, so a single process gets the model back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_train.config import Config
from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.param_meta import ParamMeta, ensure_meta


@dataclass
class ParallelModel:
    """This rank's share of the model and the machinery to train it."""

    chunks: list[nn.Module]
    """Model chunks held by this rank: the whole model, or its pipeline (virtual) stages."""
    groups: ProcessGroups
    """The process groups it was parallelized over."""
    schedule: Any = None
    """Pipeline schedule (moe_train.parallel.pipeline) when pp > 1, else None."""
    reducer: Any = None
    """Gradient reducer (moe_train.parallel.data_parallel.GradReducer) when world > 1, else None."""

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(local name, parameter) of every chunk; names are unique across chunks."""
        return [(name, p) for chunk in self.chunks for name, p in chunk.named_parameters()]

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def metas(self) -> dict[str, ParamMeta]:
        """Canonical placement of every local parameter, keyed by local name."""
        out: dict[str, ParamMeta] = {}
        for chunk in self.chunks:
            out.update(ensure_meta(chunk))
        return out

    def train(self, mode: bool = True) -> None:
        for chunk in self.chunks:
            chunk.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (already scaled) loss; an engine that owns backward overrides it."""
        loss.backward()


def parallelize(model: nn.Module, groups: ProcessGroups, cfg: Config) -> ParallelModel:
    """Apply TP/SP → EP → CP → PP → DP to `model` for this rank (in place where possible)."""
    return attach_grad_reducer(shard_model(model, groups, cfg))


def shard_model(model: nn.Module, groups: ProcessGroups, cfg: Config) -> ParallelModel:
    """TP/SP → EP → CP → PP: this rank's chunks of the model, every parameter with its ParamMeta."""
    if groups.tp_size > 1:
        from moe_train.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, groups)
    if groups.ep_size > 1 or groups.etp_size > 1 or groups.tp_size > 1 or groups.cp_size > 1:
        from moe_train.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, groups)
    if groups.cp_size > 1:
        from moe_train.parallel.context_parallel import apply_context_parallel

        apply_context_parallel(model, groups)
    if groups.size("lbl") > 1:
        from moe_train.parallel.load_balance import apply_load_balance_groups

        apply_load_balance_groups(model, groups)
    chunks: list[nn.Module] = [model]
    schedule = None
    if groups.pp_size > 1:
        from moe_train.model import MoETransformer
        from moe_train.parallel.pipeline import build_pipeline

        if not isinstance(model, MoETransformer):
            raise TypeError(f"pipeline parallelism needs a MoETransformer, got {type(model).__name__}")
        stage_chunks, schedule = build_pipeline(model, groups, cfg)
        chunks = list(stage_chunks)
    apply_memory_options(chunks, cfg)
    pm = ParallelModel(chunks=chunks, groups=groups, schedule=schedule)
    pm.metas()
    return pm


def apply_memory_options(chunks: list[nn.Module], cfg: Config) -> None:
    """Activation recompute (train.recompute), the chunked head + loss (train.loss_chunk_tokens) and the
    regional compile (train.compile) on every chunk; after the sharding, so the recomputed regions hold
    the collectives they replay and the compiled ones see the sharded parameters."""
    from moe_train.model.transformer import set_compile, set_loss_chunking, set_recompute

    for chunk in chunks:
        set_recompute(chunk, cfg.train.recompute)
        set_loss_chunking(chunk, cfg.train.loss_chunk_tokens)
        set_compile(chunk, cfg.train.compile)


def attach_grad_reducer(pm: ParallelModel) -> ParallelModel:
    """DP: reduce gradients per ParamMeta (bucketed, overlapped with backward) when world > 1."""
    if pm.groups.world_size > 1:
        from moe_train.parallel.data_parallel import GradReducer

        pm.reducer = GradReducer(pm.named_parameters(), pm.groups)
        if pm.schedule is not None:
            pm.schedule.reducer = pm.reducer
    return pm
