"""MoE feed-forward layer: router -> dispatcher -> experts -> combine (+ shared experts).

Legend: B batch, S sequence, T = B*S tokens, H hidden, E experts, N token copies sorted by expert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moe_train.config import MoEConfig
from moe_train.model.mlp import FeedForward
from moe_train.model.moe.balance import LayerBalance
from moe_train.model.moe.dispatcher import TokenDispatcher
from moe_train.model.moe.experts import GroupedExperts
from moe_train.model.moe.losses import AttachAuxLoss
from moe_train.model.moe.router import Routing, TopKRouter
from moe_train.model.recompute import ReplayGuarded

RoutingStatsReducer = Callable[[Routing], Routing]
"""Maps a Routing to one whose aux-loss statistics (tokens_per_expert_E, prob_sum_E, num_tokens,
z_loss) cover a larger token set (e.g. all sequence-parallel shards of a micro-batch); the routing
decisions themselves are left untouched. Installed from outside by the parallel code."""


@dataclass
class MoEStats:
    """Detached statistics of one MoE layer's last forward."""

    lbl: torch.Tensor
    """Load-balancing loss (unweighted, fp32 scalar)."""
    zloss: torch.Tensor
    """Router z-loss (unweighted, fp32 scalar)."""
    tokens_per_expert_E: torch.Tensor
    """Assignments per expert before capacity drops (int64)."""


def shared_ffn_size(moe_cfg: MoEConfig) -> int:
    """Hidden size of the fused shared-expert MLP (0 when there are none)."""
    per_expert = moe_cfg.shared_expert_ffn_hidden_size or moe_cfg.expert_ffn_hidden_size
    return moe_cfg.num_shared_experts * per_expert


class MoELayer(nn.Module, ReplayGuarded):
    """Token-choice top-k MoE FFN. Attaches its weighted aux loss to the output's backward.

    The attached loss is (lbl.coeff * lbl + zloss_coeff * z) / num_moe_layers, with gradient
    `aux_loss_scale` (set it for the whole model with `set_aux_loss_scale`).

    `stats_reducer` (None on one device) lets parallel code widen the token set of the aux-loss
    statistics (and of `last_stats`) without touching the routing or the dispatch. `balance`
    (moe_train.model.moe.balance) holds the LBL scope and its per-step state.
    """

    def __init__(self, hidden_size: int, moe_cfg: MoEConfig, num_moe_layers: int, layer_id: int = 0) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.top_k = moe_cfg.top_k
        self.lbl_coeff = moe_cfg.lbl.coeff / num_moe_layers
        self.zloss_coeff = moe_cfg.zloss_coeff / num_moe_layers
        self.aux_loss_scale = 1.0
        self.router = TopKRouter(
            hidden_size,
            moe_cfg.num_experts,
            moe_cfg.top_k,
            moe_cfg.score_func,
            moe_cfg.norm_topk_prob,
            expert_bias=moe_cfg.bias_update_rate > 0,
        )
        self.balance = LayerBalance(moe_cfg.num_experts, moe_cfg.top_k, moe_cfg.lbl.scope, moe_cfg.lbl.global_mode)
        self.dispatcher = TokenDispatcher.from_config(moe_cfg)
        self.experts = GroupedExperts(moe_cfg.num_experts, hidden_size, moe_cfg.expert_ffn_hidden_size)
        self.experts.kernel_backend = moe_cfg.dispatch.backend
        shared = shared_ffn_size(moe_cfg)
        self.shared_experts = FeedForward(hidden_size, shared) if shared > 0 else None
        self.last_stats: MoEStats | None = None
        self.stats_reducer: RoutingStatsReducer | None = None

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        """x_BSH -> y_BSH; records `last_stats`."""
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(B * S, H)
        routing = self.router(x_TH)
        x_sorted_NH, tokens_per_expert_E, ctx = self.dispatcher.dispatch(x_TH, routing)
        splits = ctx.expert_splits if ctx.expert_splits is not None else tokens_per_expert_E
        y_sorted_NH = self.experts(x_sorted_NH, splits)
        y_TH = self.dispatcher.combine(y_sorted_NH, ctx)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)
        y_TH = self._attach_aux_loss(y_TH, routing, B)
        return y_TH.view(B, S, H)

    def _attach_aux_loss(self, y_TH: torch.Tensor, routing: Routing, batch_size: int) -> torch.Tensor:
        """Compute the aux losses, record stats, and hook the weighted sum onto y's backward."""
        local = routing = self.balance.observe(routing, batch_size)
        if self.balance.counting:
            return y_TH
        if self.stats_reducer is not None:
            routing = self.stats_reducer(routing)
        lbl = self.balance.loss(local, routing)
        if not self.replaying:  # a recompute replays this forward: keep the first one's statistics
            self.last_stats = MoEStats(lbl.detach(), routing.z_loss.detach(), routing.tokens_per_expert_E)
        if not torch.is_grad_enabled() or (self.lbl_coeff == 0 and self.zloss_coeff == 0):
            return y_TH
        aux_loss = self.lbl_coeff * lbl + self.zloss_coeff * routing.z_loss
        return AttachAuxLoss.apply(y_TH, aux_loss, self.aux_loss_scale)
