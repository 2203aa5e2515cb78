"""Load balancing across micro-batches and ranks: the exact global-batch LBL's counting pass, the
streaming modes' count reduction, the aux-loss-free bias update and the per-domain routing counts.

Legend: L MoE layers of the whole model, D domains, E experts, B sequences, M micro-batches.

One optimizer step with `StepBalancer` (the trainer calls `begin_step` before the micro-batches'
forward/backward and `end_step` after the optimizer step):

1. `begin_step`: every MoE layer learns the step's token count N (all micro-batches of all DP
   replicas) and the share size N / (M * dp) (one micro-batch of one replica). With
   moe.lbl.scope 'global' and global_mode 'exact', a **counting pass** runs: a no-grad forward of
   every micro-batch through the transformer blocks (no LM head; pipelined under pp > 1) in which the
   MoE layers only count their routing; the counts of this rank's layers are summed over the ``lbl``
   group (all ranks of the pipeline stage: every DP replica and sequence-parallel shard) in one
   all-reduce and handed to each layer. The training forwards then attach, per micro-batch,
   N_E * sum_i f_i * prob_sum_i / (N / (M*dp)) with the global f: after the 1/M gradient-accumulation
   scale and the DP reducer's mean this is exactly the gradient of the LBL of the whole global batch,
   and the mean of the attached values (the reported lbl) is its value.
2. Training forwards record each micro-batch's local per-sequence counts (cheap: B x E integers).
3. `end_step`: the counts per (layer, domain, expert) are summed over the world in one all-reduce
   (each rank contributes its own layers' local counts, so each token is counted once); in exact mode
   the training forwards' counts are checked against the counting pass's (they must agree: same
   parameters, same inputs; on GPUs non-deterministic kernels could flip a tie, which is logged);
   streaming mode keeps the step's global f for the next step; the expert bias moves by
   rate * sign(mean load - load_i), the same on every rank since the counts are.

Cost of the exact mode: one extra forward without the head per step (about a third of a step's
compute, less with a large vocabulary) and one all-reduce of L_stage x E integers; no extra activation
memory (the pass keeps no graph). See docs/load_balancing.md for measurements.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from moe_train.config import Config
from moe_train.model.moe.balance import update_expert_bias
from moe_train.model.moe.layer import MoELayer
from moe_train.model.transformer import MoETransformer
from moe_train.parallel.collectives import Group
from moe_train.parallel.groups import ProcessGroups

if TYPE_CHECKING:
    from moe_train.data import Batch
    from moe_train.parallel.parallelize import ParallelModel

logger = logging.getLogger(__name__)


@dataclass
class StageCountReducer:
    """`LayerBalance.count_reducer`: sums a layer's per-expert counts over the ``lbl`` group."""

    group: Group

    def __call__(self, counts_E: torch.Tensor) -> torch.Tensor:
        out = counts_E.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> StageCountReducer:
        """Stateless, and process groups cannot be copied: model copies share it."""
        return self


def moe_layers(modules: nn.Module | list[nn.Module]) -> dict[int, MoELayer]:
    """This rank's MoE layers by layer id (each once, also when pipeline chunks share modules)."""
    found: dict[int, MoELayer] = {}
    for module in modules if isinstance(modules, list) else [modules]:
        for m in module.modules():
            if isinstance(m, MoELayer):
                found[m.layer_id] = m
    return dict(sorted(found.items()))


def apply_load_balance_groups(model: nn.Module, groups: ProcessGroups) -> None:
    """The streaming global modes sum each forward's counts over the ``lbl`` group (when it has > 1 rank)."""
    if groups.size("lbl") == 1:
        return
    for layer in moe_layers(model).values():
        layer.balance.count_reducer = StageCountReducer(groups.lbl)


@torch.no_grad()
def counting_pass(pm: ParallelModel, batches: list[Batch], device: torch.device, autocast: Any = None) -> None:
    """Forward every micro-batch through the blocks with the MoE layers in counting mode."""
    layers = moe_layers(pm.chunks).values()
    for layer in layers:
        layer.balance.counting = True
    try:
        if pm.schedule is not None:
            pm.schedule.forward_layers(batches, device, autocast)
            return
        (chunk,) = pm.chunks  # the transformer, or an engine wrapping it (engine.name=deepspeed)
        model = next(m for m in chunk.modules() if isinstance(m, MoETransformer))
        for batch in batches:
            with autocast if autocast is not None else nullcontext():
                model.run_layers(model.embed(batch.tokens_BS.to(device)))
    finally:
        for layer in layers:
            layer.balance.counting = False


class StepBalancer:
    """Drives the per-step protocol of every MoE layer this rank holds (see the module docstring)."""

    def __init__(self, pm: ParallelModel, cfg: Config, num_domains: int) -> None:
        self.pm, self.groups = pm, pm.groups
        self.device = next(p for chunk in pm.chunks for p in chunk.parameters()).device
        self.layers = moe_layers(pm.chunks)
        self.first_moe = cfg.moe.first_k_dense
        self.num_moe = cfg.model.num_layers - cfg.moe.first_k_dense
        self.num_experts, self.num_domains = cfg.moe.num_experts, max(num_domains, 1)
        lbl = cfg.moe.lbl
        self.exact = lbl.scope == "global" and lbl.global_mode == "exact" and lbl.coeff > 0 and self.num_moe > 0
        self.bias_rate = cfg.moe.bias_update_rate
        self.count_mismatch = 0
        """Assignments the training forwards routed differently from the counting pass, last step."""

    def begin_step(self, batches: list[Batch], device: torch.device, autocast: AbstractContextManager) -> None:
        """Tell the layers the step's sizes; in exact global mode run the counting pass."""
        share = batches[0].tokens_BS.numel()
        total = sum(b.tokens_BS.numel() for b in batches) * self.groups.dp_size
        for layer in self.layers.values():
            layer.balance.start_step(total, share)
        if not self.exact:
            return
        counting_pass(self.pm, batches, device, autocast)  # every pp rank: the stages pass activations on
        if self.layers:  # the same on every rank of the stage, so the all-reduce is matched
            counted = [layer.balance.counted_E for layer in self.layers.values()]
            counts_LE = torch.stack([c for c in counted if c is not None])
            self.groups.all_reduce(counts_LE, "lbl")
            for layer, counts_E in zip(self.layers.values(), counts_LE, strict=True):
                layer.balance.set_global_counts(counts_E)

    def step_counts(self, batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's routing counts, reduced over every rank, without a host sync or any state change.

        Returns (counts_LDE, mismatch_L): assignments per MoE layer of the whole model, domain and expert
        (equal on all ranks), and, per MoE layer this rank holds, the assignments its training forwards
        routed differently from the exact mode's counting pass (zeros outside exact mode). The trainer
        reads both back with the step's other values; `report_mismatch` and `end_step` take them then."""
        shape = (self.num_moe, self.num_domains, self.num_experts)
        counts_LDE = torch.zeros(shape, dtype=torch.long, device=self.device)
        mismatch_L = torch.zeros(len(self.layers), dtype=torch.long, device=self.device)
        domain_N = torch.cat([b.domain_B for b in batches]).to(self.device)
        for i, (layer_id, layer) in enumerate(self.layers.items()):
            seq_counts = layer.balance.seq_counts
            if not seq_counts:
                continue
            counts_NE = torch.cat(seq_counts).to(self.device)
            counts_LDE[layer_id - self.first_moe].index_add_(0, domain_N, counts_NE)
            counted_E = layer.balance.counted_E
            if self.exact and counted_E is not None:
                mismatch_L[i] = (counts_NE.sum(0) - counted_E.to(self.device)).abs().sum() // 2
        self.groups.all_reduce(counts_LDE, "grad_norm")
        return counts_LDE, mismatch_L

    def end_step(self, counts_LDE: torch.Tensor) -> None:
        """The step trained: update the layers' streaming state and expert biases from `step_counts`."""
        for layer_id, layer in self.layers.items():
            global_E = counts_LDE[layer_id - self.first_moe].sum(0)
            layer.balance.end_step(global_E)
            if self.bias_rate > 0 and layer.router.expert_bias_E is not None:
                update_expert_bias(layer.router.expert_bias_E, global_E, self.bias_rate)

    def report_mismatch(self, mismatch_L: list[int]) -> None:
        """Exact mode: the training forwards must route as the counting pass did; `mismatch_L` (host
        copy of `step_counts`' second value) counts the assignments routed differently, per layer."""
        self.count_mismatch = 0
        for layer_id, diff in zip(self.layers, mismatch_L, strict=True):
            if diff:
                self.count_mismatch += diff
                logger.warning(
                    "global LBL: layer %d routed %d assignments differently in training than in the counting"
                    " pass on rank %d (non-deterministic kernels?); f came from the counting pass",
                    layer_id,
                    diff,
                    self.groups.rank,
                )
