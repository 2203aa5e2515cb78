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
from moe_train.parallel.pipeline import PipelineStepResult
from moe_train.utils.phases import phase


@dataclass
class StepStats:
    """Statistics of one step on the host (`unpack_step_stats`), equal on every rank."""

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


@dataclass
class StepTotals:
    """This rank's statistics of one step, still on the device (what `forward_backward` returns)."""

    sums_3: torch.Tensor
    """lm loss, LBL, z-loss, each the mean over micro-batches (float64 [3])."""
    domain_sum: torch.Tensor
    """Per domain: sum of per-sequence mean losses (float64)."""
    domain_count: torch.Tensor
    """Per domain: number of sequences (float64)."""
    counts_LE: torch.Tensor | None = None
    """Routed assignments per MoE layer and expert, summed over micro-batches (int64)."""


def forward_backward(
    pm: ParallelModel,
    batches: list[Batch],
    device: torch.device,
    autocast: AbstractContextManager,
    num_domains: int,
) -> StepTotals:
    """Run every micro-batch forward and backward (pipelined when pp > 1); returns this rank's statistics
    on the device (no host sync: the trainer reads them back with the step's other values, `read_back`)."""
    scale = 1.0 / len(batches)
    if pm.schedule is not None:  # sets the aux-loss scale on its chunks itself
        with phase("forward/backward (pipeline)"):
            result = pm.schedule.forward_backward(batches, scale, device, autocast, num_domains)
        return _pipeline_totals(result, device)
    (model,) = pm.chunks
    set_aux_loss_scale(model, scale)
    # accumulated on the device: read back once per step (read_back), not ~5 times per micro-batch
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
    return StepTotals(sums_3, domain_sum, domain_count, counts_LE)


def _pipeline_totals(result: PipelineStepResult, device: torch.device) -> StepTotals:
    """The pipeline schedule's result as StepTotals (device ops only)."""

    def mean_or_zero(x: torch.Tensor) -> torch.Tensor:
        return x.double().mean() if x.numel() else torch.zeros((), dtype=torch.float64, device=device)

    sums_3 = torch.stack([mean_or_zero(x.to(device)) for x in (result.lm_loss_M, result.lbl_LM, result.zloss_LM)])
    domain_sum, domain_count = result.domain_sum.to(device), result.domain_count.to(device)
    return StepTotals(sums_3, domain_sum, domain_count, result.tokens_per_expert_LE.to(device))


def reduce_step_totals(totals: StepTotals, groups: ProcessGroups) -> torch.Tensor:
    """Losses averaged over DP replicas, domain and expert counts summed, packed in one float64 device
    tensor (equal on every rank; `unpack_step_stats` reads it on the host).

    Only one rank per DP replica (last pipeline stage, tp rank 0) contributes, so TP and PP copies of
    the same numbers are not double counted.
    """
    parts = [totals.sums_3, totals.domain_sum, totals.domain_count]
    if totals.counts_LE is not None:
        parts.append(totals.counts_LE.double().flatten())
    packed = torch.cat(parts)
    if groups.world_size == 1:
        return packed
    packed = packed * float(groups.contributes_domain_loss)
    groups.all_reduce(packed, "grad_norm")
    packed[:3] /= groups.dp_size
    return packed


def unpack_step_stats(host: torch.Tensor, totals: StepTotals) -> StepStats:
    """StepStats from `reduce_step_totals`'s packing, copied to the host (`totals` gives the shapes)."""
    num_domains = totals.domain_sum.numel()
    lm, lbl, zloss = host[:3].tolist()
    counts = None
    if totals.counts_LE is not None:
        counts = host[3 + 2 * num_domains :].round().long().view(totals.counts_LE.shape)
    return StepStats(lm, lbl, zloss, host[3 : 3 + num_domains], host[3 + num_domains : 3 + 2 * num_domains], counts)


def read_back(device_values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy several device tensors to the host in one transfer (the step's one host sync); returns each
    as a float64 CPU tensor of its own shape (integers up to 2**53 exactly)."""
    flat = [t.detach().double().flatten() for t in device_values]
    host = torch.cat(flat).cpu()
    return [part.view(t.shape) for part, t in zip(host.split([f.numel() for f in flat]), device_values, strict=True)]
