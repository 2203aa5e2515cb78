"""Single-device model code: decoder-only transformer with MoE feed-forward layers."""

from moe_train.model.attention import Attention, causal_attention
from moe_train.model.build import build_model
from moe_train.model.counting import ParamCounts, count_parameters, flops_per_token
from moe_train.model.mlp import FeedForward
from moe_train.model.moe import (
    AttachAuxLoss,
    DispatchContext,
    GroupedExperts,
    MoELayer,
    MoEStats,
    Routing,
    TokenDispatcher,
    TopKRouter,
    expert_capacity,
    load_balancing_loss,
    router_z_loss,
)
from moe_train.model.norms import RMSNorm
from moe_train.model.rope import RotaryEmbedding, apply_rope, rope_angles
from moe_train.model.transformer import (
    IGNORE_INDEX,
    ModelOutput,
    MoETransformer,
    TransformerBlock,
    collect_moe_stats,
    init_weights,
    set_aux_loss_scale,
    summarise_moe_stats,
    token_cross_entropy,
)

__all__ = [
    "IGNORE_INDEX",
    "AttachAuxLoss",
    "Attention",
    "DispatchContext",
    "FeedForward",
    "GroupedExperts",
    "ModelOutput",
    "MoELayer",
    "MoEStats",
    "MoETransformer",
    "ParamCounts",
    "RMSNorm",
    "RotaryEmbedding",
    "Routing",
    "TokenDispatcher",
    "TopKRouter",
    "TransformerBlock",
    "apply_rope",
    "build_model",
    "causal_attention",
    "collect_moe_stats",
    "count_parameters",
    "expert_capacity",
    "flops_per_token",
    "init_weights",
    "load_balancing_loss",
    "rope_angles",
    "router_z_loss",
    "set_aux_loss_scale",
    "summarise_moe_stats",
    "token_cross_entropy",
]
