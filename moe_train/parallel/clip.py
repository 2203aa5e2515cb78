"""Global gradient-norm clipping that counts every parameter exactly once across all parallel groups."""

from __future__ import annotations

import torch

from moe_train.parallel.data_parallel import NamedParam, ParamsLike, named_params_with_meta
from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.param_meta import owns_unique_copy


@torch.no_grad()
def global_grad_norm(params: ParamsLike, groups: ProcessGroups) -> torch.Tensor:
    """L2 norm of the canonical (single-device) gradient, identical on every rank.

    Each rank takes the per-tensor norms of the gradients it counts (fp32, as torch does), sums their
    squares in fp64, all-reduces that sum over the `grad_norm` group (the world) and takes the root.
    In one process it is torch.nn.utils.clip_grad_norm_'s arithmetic, bit for bit.
    Parameters replicated over several groups (a norm weight on every TP rank and DP replica, an expert
    on every EDP rank) must be counted on one rank only, or the norm is inflated and clipping is wrong:
    the bug class of DeepSpeed issue #8475, where norms were double-counted across parallel groups.
    """
    return _global_norm(named_params_with_meta(params), groups)


def _global_norm(entries: list[NamedParam], groups: ProcessGroups) -> torch.Tensor:
    grads = [p.grad for _, p, meta in entries if p.grad is not None and owns_unique_copy(meta, groups)]
    device = entries[0][1].device if entries else torch.device("cpu")
    norms = torch._foreach_norm(grads, 2.0) if grads else []
    if groups.size("grad_norm") == 1:  # one process: exactly torch.nn.utils.clip_grad_norm_'s arithmetic
        if not norms:
            return torch.zeros((), device=device)
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2.0)
    sum_sq = torch.zeros((), dtype=torch.float64, device=device)
    if norms:
        sum_sq = torch.stack([n.to(device, torch.float64) for n in norms]).square().sum()
    groups.all_reduce(sum_sq, "grad_norm")
    dtype = grads[0].dtype if grads else torch.float32
    return sum_sq.sqrt().to(dtype)


@torch.no_grad()
def clip_grad_norm_(params: ParamsLike, max_norm: float, groups: ProcessGroups) -> torch.Tensor:
    """Scale all gradients by min(1, max_norm / (norm + 1e-6)) like torch.nn.utils.clip_grad_norm_,
    with the norm of `global_grad_norm` (each parameter counted once); returns that norm.

    `max_norm=math.inf` only measures (the grads are multiplied by 1). Every rank must call this.
    """
    entries = named_params_with_meta(params)
    total_norm = _global_norm(entries, groups)
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    grads = [p.grad for _, p, _ in entries if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, clip_coef.to(grads[0].device))
    return total_norm
