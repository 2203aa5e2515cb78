"""Top-k token-choice router.

Legend: T tokens, H hidden, E experts, K top_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.model.moe.losses import router_z_loss


@dataclass
class Routing:
    """What the router decided for T tokens, plus the statistics the aux losses need."""

    topk_idx_TK: torch.Tensor
    """Expert ids (int64) of each token's K choices, highest score first."""
    topk_weight_TK: torch.Tensor
    """Combine weights (fp32, with grad), renormalised to sum 1 when moe.norm_topk_prob."""
    topk_score_TK: torch.Tensor
    """Raw router scores of the choices (fp32, before renormalisation); the 'probs' drop policy ranks by it."""
    tokens_per_expert_E: torch.Tensor
    """Assignments per expert before capacity drops (detached int64)."""
    prob_sum_E: torch.Tensor
    """Sum over tokens of each expert's router probability (fp32, with grad)."""
    num_tokens: int
    """T."""
    z_loss: torch.Tensor
    """Router z-loss of these tokens (fp32 scalar, with grad)."""
    probs_TE: torch.Tensor | None = None
    """Per-token router probabilities the LBL's p_i averages (fp32, with grad; rows sum to 1)."""
    seq_counts_BE: torch.Tensor | None = None
    """Sequence scope: assignments per sequence and expert (detached int64); None otherwise."""
    seq_prob_sum_BE: torch.Tensor | None = None
    """Sequence scope: per sequence, the sum over its tokens of each expert's probability (with grad)."""
    seq_len: int = 0
    """Sequence scope: tokens of each sequence that these statistics cover."""


class TopKRouter(nn.Module):
    """Gate (nn.Linear H->E, no bias, applied in fp32) -> softmax/sigmoid scores -> top-k.

    With `expert_bias` (aux-loss-free balancing, DeepSeek-V3 arXiv 2412.19437) a persistent buffer
    `expert_bias_E` is added to the scores that choose the top-k experts only; the combine weights and
    the LBL's probabilities use the unbiased scores. The bias is trained outside autograd
    (moe_train.model.moe.balance.update_expert_bias).
    """

    expert_bias_E: torch.Tensor | None

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        score_func: str = "softmax",
        norm_topk_prob: bool = True,
        expert_bias: bool = False,
    ) -> None:
        super().__init__()
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func ({score_func!r}) must be 'softmax' or 'sigmoid'")
        self.top_k = top_k
        self.score_func = score_func
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.register_buffer("expert_bias_E", torch.zeros(num_experts) if expert_bias else None)

    def forward(self, x_TH: torch.Tensor) -> Routing:
        """Route T tokens; all math in fp32, also under bf16 autocast."""
        with torch.autocast(device_type=x_TH.device.type, enabled=False):
            logits_TE = F.linear(x_TH.float(), self.gate.weight.float())
            if self.score_func == "softmax":
                scores_TE = logits_TE.softmax(dim=-1)
                probs_TE = scores_TE
            else:
                scores_TE = logits_TE.sigmoid()
                probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
            topk_score_TK, topk_idx_TK = self._select(scores_TE)
            topk_weight_TK = topk_score_TK
            if self.norm_topk_prob:
                topk_weight_TK = topk_score_TK / topk_score_TK.sum(dim=-1, keepdim=True)
            counts_E = torch.bincount(topk_idx_TK.flatten(), minlength=logits_TE.shape[-1])
            return Routing(
                topk_idx_TK=topk_idx_TK,
                topk_weight_TK=topk_weight_TK,
                topk_score_TK=topk_score_TK.detach(),
                tokens_per_expert_E=counts_E.detach(),
                prob_sum_E=probs_TE.sum(dim=0),
                num_tokens=x_TH.shape[0],
                z_loss=router_z_loss(logits_TE),
                probs_TE=probs_TE,
            )

    def _select(self, scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, expert ids) of each token's top-k: by score, or by score + expert bias when set."""
        if self.expert_bias_E is None:
            return scores_TE.topk(self.top_k, dim=-1)
        topk_idx_TK = (scores_TE.detach() + self.expert_bias_E.float()).topk(self.top_k, dim=-1).indices
        return scores_TE.gather(-1, topk_idx_TK), topk_idx_TK
