"""Router auxiliary losses and the Megatron-style hook that attaches them in backward.

Legend: T tokens, E experts.

LBL (Switch Transformer, arXiv 2101.03961): N_E * sum_i f_i * P_i with
f_i = counts_i / (T * top_k) (assignments before capacity drops) and P_i = prob_sum_i / T.
It is written over explicit statistics so that callers may all-reduce `counts_E` (and
`prob_sum_E`, `num_tokens`) over a larger batch before calling it.
Sequence-wise LBL (DeepSeek-V2/V3): the same per sequence, averaged over sequences.
Global-batch LBL (arXiv 2501.11873): f_i over every token of the optimizer step; `global_lbl_share`
is one token share's term (a micro-batch of one rank), p_i keeping its gradient.
Router z-loss (ST-MoE, arXiv 2202.08906): mean_t logsumexp(logits_t)^2.
"""

from __future__ import annotations

from typing import Any

import torch


def load_balancing_loss(
    counts_E: torch.Tensor, prob_sum_E: torch.Tensor, num_tokens: int | torch.Tensor, top_k: int
) -> torch.Tensor:
    """N_E * sum_i (counts_i / (T*k)) * (prob_sum_i / T); gradients flow through prob_sum_E only."""
    num_experts = prob_sum_E.shape[-1]
    f_E = counts_E.detach().to(prob_sum_E.dtype) / (num_tokens * top_k)
    p_E = prob_sum_E / num_tokens
    return num_experts * (f_E * p_E).sum()


def sequence_load_balancing_loss(
    counts_BE: torch.Tensor, prob_sum_BE: torch.Tensor, tokens_B: int | torch.Tensor, top_k: int
) -> torch.Tensor:
    """Mean over sequences b of N_E * sum_i (counts_bi / (T_b*k)) * (prob_sum_bi / T_b).

    `tokens_B` is every sequence's length T_b (an int when they are all equal); gradients flow through
    prob_sum_BE only."""
    num_experts = prob_sum_BE.shape[-1]
    tokens_B1 = torch.as_tensor(tokens_B, dtype=prob_sum_BE.dtype, device=prob_sum_BE.device).reshape(-1, 1)
    f_BE = counts_BE.detach().to(prob_sum_BE.dtype) / (tokens_B1 * top_k)
    p_BE = prob_sum_BE / tokens_B1
    return num_experts * (f_BE * p_BE).sum(-1).mean()


def global_lbl_share(
    global_counts_E: torch.Tensor,
    global_tokens: int | float | torch.Tensor,
    prob_sum_E: torch.Tensor,
    share_tokens: float,
    top_k: int,
) -> torch.Tensor:
    """One token share's term of the global-batch LBL: N_E * sum_i f_i * prob_sum_i / share_tokens.

    f_i = global_counts_i / (global_tokens * k) covers the whole global batch (detached); prob_sum_E
    covers this share only (with grad). With the global batch cut into n shares (micro-batches x
    data-parallel ranks) and share_tokens = global_tokens / n, the mean over the shares of this term
    is the LBL of the whole batch, in value and in gradient, however unequal the shares are."""
    num_experts = prob_sum_E.shape[-1]
    f_E = global_counts_E.detach().to(prob_sum_E.dtype) / (global_tokens * top_k)
    return num_experts * (f_E * prob_sum_E).sum() / share_tokens


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)^2, in fp32."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


class AttachAuxLoss(torch.autograd.Function):
    """Identity on `out`; in backward gives `aux_loss` the gradient `scale` (Megatron's
    MoEAuxLossAutoScaler). Lets every MoE layer add its aux loss without returning it, which
    also works when a pipeline stage holds only some layers."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, aux_loss: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Return `out` unchanged; remember the aux loss's shape and the scale."""
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Pass the output gradient through; d(aux_loss) = scale."""
        (aux_loss,) = ctx.saved_tensors
        return grads[0], torch.full_like(aux_loss, ctx.scale), None
