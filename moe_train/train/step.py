"""Forward/backward of one global batch on one rank, and the reduction of its statistics over ranks.

The loss of a step is the mean over micro-batches of each micro-batch's mean token loss, plus the
weighted aux losses; gradients are accumulated with scale 1/M (M micro-batches of this DP replica) and
MoE layers attach their aux-loss gradients with the same scale.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from moe_train.data import Batch
from moe_train.model import set_aux_loss_scale
from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.parallelize import ParallelModel
from moe_train.utils.phases import phase


@dataclass
class StepStats:
    """Statistics of one step; after `reduce_step_stats` equal on every rank."""

    lm_loss: float
    """Mean over micro-batches of the mean token loss."""
    lbl: float
    """Mean over micro-batches of the load-balancing loss (mean over MoE layers)."""
    zloss: float
    """Mean over micro-batches of the router z-loss (mean over MoE layers)."""
    domain_sum: torch.Tensor
    """Per domain: sum of per-sequence mean losses (float64)."""
    domain_count: torch.Tensor
    """Per domain: number of sequences (float64)."""
    expert_counts_LE: torch.Tensor | None = None
    """Routed assignments per MoE layer and expert, summed over micro-batches."""


def forward_backward(
    pm: ParallelModel,
    batches: list[Batch],
    device: torch.device,
    autocast: AbstractContextManager,
    num_domains: int,
) -> StepStats:
    """Run every micro-batch forward and backward (pipelined when pp > 1); returns this rank's stats."""
    scale = 1.0 / len(batches)
    if pm.schedule is not None:  # sets the aux-loss scale on its chunks itself
        with phase("forward/backward (pipeline)"):
            result = pm.schedule.forward_backward(batches, scale, device, autocast, num_domains)
        return StepStats(
            result.lm_loss, result.lbl, result.zloss, result.domain_sum, result.domain_count, result.expert_counts_LE
        )
    (model,) = pm.chunks
    set_aux_loss_scale(model, scale)
    # accumulated on the device: one host copy at the end of the step instead of ~5 per micro-batch
    sums_3 = torch.zeros(3, dtype=torch.float64, device=device)  # lm, lbl, zloss
    domain_sum = torch.zeros(num_domains, dtype=torch.float64, device=device)
    domain_count = torch.zeros_like(domain_sum)
    counts_LE: torch.Tensor | None = None
    for index, batch in enumerate(batches):
        if pm.reducer is not None:
            pm.reducer.set_sync(index == len(batches) - 1)
        with autocast, phase("forward"):
            out = model(batch.tokens_BS.to(device), batch.labels_BS.to(device))
        assert out.token_loss_BS is not None
        lm_loss = out.token_loss_BS.mean()
        with phase("backward"):
            pm.backward(lm_loss * scale)
        sums_3 += torch.stack([lm_loss.detach(), out.lbl, out.zloss]).double() * scale
        per_seq = out.token_loss_BS.detach().double().mean(dim=1)
        domain_B = batch.domain_B.to(device)
        domain_sum.index_add_(0, domain_B, per_seq)
        domain_count.index_add_(0, domain_B, torch.ones_like(per_seq))
        counts = out.tokens_per_expert_LE.detach()
        counts_LE = counts if counts_LE is None else counts_LE + counts
    return _host_stats(sums_3, domain_sum, domain_count, counts_LE)


def _host_stats(
    sums_3: torch.Tensor, domain_sum: torch.Tensor, domain_count: torch.Tensor, counts_LE: torch.Tensor | None
) -> StepStats:
    """StepStats from the device accumulators, in one device-to-host copy."""
    parts = [sums_3, domain_sum, domain_count]
    if counts_LE is not None:
        parts.append(counts_LE.double().flatten())
    host = torch.cat(parts).cpu()  # the step's one host sync for its statistics
    num_domains = domain_sum.numel()
    lm, lbl, zloss = host[:3].tolist()
    counts = None
    if counts_LE is not None:
        counts = host[3 + 2 * num_domains :].round().long().view(counts_LE.shape)
    return StepStats(lm, lbl, zloss, host[3 : 3 + num_domains], host[3 + num_domains : 3 + 2 * num_domains], counts)


def reduce_step_stats(stats: StepStats, groups: ProcessGroups, device: torch.device) -> StepStats:
    """Average losses over DP replicas, sum domain and expert counts; every rank gets the same values.

    Only one rank per DP replica (last pipeline stage, tp rank 0) contributes, so TP and PP copies of
    the same numbers are not double counted.
    """
    if groups.world_size == 1:
        return stats
    num_domains = stats.domain_sum.numel()
    head = torch.tensor([stats.lm_loss, stats.lbl, stats.zloss], dtype=torch.float64)
    packed = torch.cat([head, stats.domain_sum, stats.domain_count])
    if stats.expert_counts_LE is not None:
        packed = torch.cat([packed, stats.expert_counts_LE.double().flatten()])
    packed = (packed * float(groups.contributes_domain_loss)).to(device)  # NCCL reduces device tensors only
    groups.all_reduce(packed, "grad_norm")
    packed = packed.cpu()
    lm, lbl, zloss = (packed[:3] / groups.dp_size).tolist()
    domain_sum = packed[3 : 3 + num_domains]
    domain_count = packed[3 + num_domains : 3 + 2 * num_domains]
    counts = None
    if stats.expert_counts_LE is not None:
        counts = packed[3 + 2 * num_domains :].view_as(stats.expert_counts_LE).round().long()
    return StepStats(lm, lbl, zloss, domain_sum, domain_count, counts)
