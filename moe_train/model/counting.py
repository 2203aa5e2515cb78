"""Analytic parameter and FLOP counts (no allocation; fine for 46B-parameter presets)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.moe.layer import shared_ffn_size


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model shape."""

    total: int
    """Every parameter (a tied embedding counted once)."""
    active: int
    """Parameters touched per token: attention, norms, dense MLPs, router, top_k routed experts,
    shared experts, input embedding and output layer."""
    embedding: int
    """Input embedding plus output projection (V*H each; once when tied). total - embedding is the
    'non-embedding' count model cards report."""


@dataclass(frozen=True)
class _Breakdown:
    attn_matmul: int  # wq, wk, wv, wo
    layer_norms: int  # attention_norm, ffn_norm, q/k norms
    dense_mlp: int
    router: int
    expert: int  # one routed expert
    shared: int
    embed: int  # V * H
    num_dense: int
    num_moe: int


def qk_norm_parameters(m: ModelConfig) -> int:
    """Weights of one layer's q and k norms: 2 * head_dim per head, or (N + G) * head_dim over the full width."""
    if not m.qk_norm:
        return 0
    return (m.num_heads + m.num_kv_heads) * m.head_dim if m.qk_norm_scope == "full" else 2 * m.head_dim


def _breakdown(m: ModelConfig, moe: MoEConfig) -> _Breakdown:
    H = m.hidden_size
    q_dim, kv_dim = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    return _Breakdown(
        attn_matmul=H * q_dim + 2 * H * kv_dim + q_dim * H,
        layer_norms=2 * H + qk_norm_parameters(m),
        dense_mlp=3 * H * m.ffn_hidden_size,
        router=H * moe.num_experts,
        expert=3 * H * moe.expert_ffn_hidden_size,
        shared=3 * H * shared_ffn_size(moe),
        embed=m.vocab_size * H,
        num_dense=moe.first_k_dense,
        num_moe=m.num_layers - moe.first_k_dense,
    )


def count_parameters(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> ParamCounts:
    """Total / active / embedding parameter counts of `MoETransformer(model_cfg, moe_cfg)`."""
    b = _breakdown(model_cfg, moe_cfg)
    embedding = b.embed * (1 if model_cfg.tie_embeddings else 2)
    common = (
        embedding
        + model_cfg.hidden_size  # final norm
        + model_cfg.num_layers * (b.attn_matmul + b.layer_norms)
        + b.num_dense * b.dense_mlp
        + b.num_moe * (b.router + b.shared)
    )
    return ParamCounts(
        total=common + b.num_moe * moe_cfg.num_experts * b.expert,
        active=common + b.num_moe * moe_cfg.top_k * b.expert,
        embedding=embedding,
    )


def flops_per_token(model_cfg: ModelConfig, moe_cfg: MoEConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) in the 6N + attention form of PaLM
    (arXiv 2204.02311, Appendix B):

        6 * N_active_matmul + 6 * num_layers * num_heads * head_dim * seq_len

    N_active_matmul counts the weights of matmuls a token goes through (attention projections,
    dense MLPs, router gate, top_k routed and all shared experts, output layer) and excludes the
    embedding lookup and norms. The attention term is PaLM's 12*L*H*Q*T halved for causal masking
    (QK^T and AV each cost 2*S*head_dim per head forward, times 3 for training, over half the keys).
    """
    b = _breakdown(model_cfg, moe_cfg)
    n_matmul = (
        model_cfg.num_layers * b.attn_matmul
        + b.num_dense * b.dense_mlp
        + b.num_moe * (b.router + moe_cfg.top_k * b.expert + b.shared)
        + b.embed  # output projection
    )
    attn = 6 * model_cfg.num_layers * model_cfg.num_heads * model_cfg.head_dim * seq_len
    return float(6 * n_matmul + attn)
