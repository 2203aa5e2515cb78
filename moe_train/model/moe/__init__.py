"""Mixture-of-Experts pieces: router, losses, dispatcher, grouped experts, layer."""

from moe_train.model.moe.balance import LayerBalance, per_sequence_counts, update_expert_bias
from moe_train.model.moe.dispatcher import (
    DispatchContext,
    TokenDispatcher,
    drop_over_capacity,
    expert_capacity,
    sort_assignments,
)
from moe_train.model.moe.experts import GroupedExperts
from moe_train.model.moe.layer import MoELayer, MoEStats, RoutingStatsReducer, shared_ffn_size
from moe_train.model.moe.losses import (
    AttachAuxLoss,
    global_lbl_share,
    load_balancing_loss,
    router_z_loss,
    sequence_load_balancing_loss,
)
from moe_train.model.moe.router import Routing, TopKRouter

__all__ = [
    "AttachAuxLoss",
    "DispatchContext",
    "GroupedExperts",
    "LayerBalance",
    "MoELayer",
    "MoEStats",
    "Routing",
    "RoutingStatsReducer",
    "TokenDispatcher",
    "TopKRouter",
    "drop_over_capacity",
    "expert_capacity",
    "global_lbl_share",
    "load_balancing_loss",
    "per_sequence_counts",
    "router_z_loss",
    "sequence_load_balancing_loss",
    "shared_ffn_size",
    "sort_assignments",
    "update_expert_bias",
]
