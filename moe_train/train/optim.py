"""AdamW with decoupled weight decay on matrices only; a fused kernel where one is available."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from moe_train.config import OptimConfig
from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.parallelize import ParallelModel
from moe_train.parallel.zero import adamw_kernel
from moe_train.utils.logging import get_logger

log = get_logger(__name__)


def param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Two groups: matrices (decayed) and vectors such as norms and biases (not decayed)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in params:
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _apex_fused_adam() -> type | None:
    try:
        from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
    except ImportError:
        return None
    return FusedAdam


def build_optimizer(
    model: nn.Module | ParallelModel,
    optim: OptimConfig,
    process_groups: ProcessGroups | None = None,
    zero1: bool = False,
) -> torch.optim.Optimizer:
    """AdamW: with optim.fused, apex FusedAdam (adam_w_mode) on CUDA when importable, else torch's fused
    kernel (CUDA and CPU; on CPU about 4x faster than foreach); without it foreach (or per parameter with
    optim.foreach=false).

    With `zero1` and more than one rank, the optimizer state is sharded over data-parallel ranks.
    """
    params = list(model.parameters())
    if zero1 and process_groups is not None and process_groups.world_size > 1:
        from moe_train.parallel.zero import build_zero_optimizer

        return build_zero_optimizer(params, optim, process_groups)
    groups = param_groups(params, optim.weight_decay)
    betas = (optim.beta1, optim.beta2)
    on_cuda = any(p.is_cuda for p in params)
    if optim.fused and on_cuda:
        apex_adam = _apex_fused_adam()
        if apex_adam is not None:
            log.info("optimizer: apex FusedAdam")
            return apex_adam(groups, adam_w_mode=True, lr=optim.lr, betas=betas, eps=optim.eps)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.eps, **adamw_kernel(optim, params))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
