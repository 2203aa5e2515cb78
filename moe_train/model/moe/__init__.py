"""Mixture-of-Experts pieces: router, losses, dispatcher, grouped experts, layer."""

from moe_train.model.moe.dispatcher import (
    DispatchContext,
    TokenDispatcher,
    drop_over_capacity,
    expert_capacity,
    sort_assignments,
)
from moe_train.model.moe.experts import GroupedExperts
from moe_train.model.moe.layer import MoELayer, MoEStats, RoutingStatsReducer, shared_ffn_size
from moe_train.model.moe.losses import AttachAuxLoss, load_balancing_loss, router_z_loss
from moe_train.model.moe.router import Routing, TopKRouter

__all__ = [
    "AttachAuxLoss",
    "DispatchContext",
    "GroupedExperts",
    "MoELayer",
    "MoEStats",
    "Routing",
    "RoutingStatsReducer",
    "TokenDispatcher",
    "TopKRouter",
    "drop_over_capacity",
    "expert_capacity",
    "load_balancing_loss",
    "router_z_loss",
    "shared_ffn_size",
    "sort_assignments",
]
