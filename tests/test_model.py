"""Transformer pieces against explicit references: attention, RoPE, counts, tying, init, pruning.

Legend: B batch, S sequence, H hidden, N query heads, G kv heads, D head_dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moe_train.config import Config, ModelConfig, MoEConfig
from moe_train.model import (
    Attention,
    ModelOutput,
    MoETransformer,
    apply_rope,
    build_model,
    count_parameters,
    flops_per_token,
    init_weights,
    rope_angles,
)

SMALL = ModelConfig(hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=40)
SMALL_MOE = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=8)


def _model(model_cfg: ModelConfig = SMALL, moe_cfg: MoEConfig = SMALL_MOE, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(model_cfg, moe_cfg)


def _tokens(b: int = 2, s: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SMALL.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_loss() -> None:
    model = _model()
    tokens = _tokens()
    out = model(tokens, torch.roll(tokens, -1, 1))
    assert isinstance(out, ModelOutput)
    assert out.token_loss_BS is not None and out.token_loss_BS.shape == (2, 10)
    assert out.token_loss_BS.dtype == torch.float32
    assert out.logits_BSV is None
    assert out.token_loss_BS.mean().item() == pytest.approx(math.log(40), rel=0.05)  # near-uniform at init
    out2 = model(tokens, torch.roll(tokens, -1, 1), return_logits=True)
    assert out2.logits_BSV is not None and out2.logits_BSV.shape == (2, 10, 40)
    assert model(tokens).token_loss_BS is None


def test_causality() -> None:
    model = _model()
    tokens = _tokens()
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % SMALL.vocab_size
    with torch.no_grad():
        a, b = model(tokens).logits_BSV, model(changed).logits_BSV
    assert a is not None and b is not None
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])  # twin: the change is visible from position 6 on


def _reference_attention(attn: Attention, x_BSH: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor):
    """Explicit GQA: repeat each kv head num_heads/num_kv_heads times, masked softmax."""
    B, S, _ = x_BSH.shape
    D = attn.head_dim
    q = apply_rope(attn.wq(x_BSH).view(B, S, -1, D), cos_SR, sin_SR).transpose(1, 2)
    k = apply_rope(attn.wk(x_BSH).view(B, S, -1, D), cos_SR, sin_SR).transpose(1, 2)
    v = attn.wv(x_BSH).view(B, S, -1, D).transpose(1, 2)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)
    out = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
    return attn.wo(out.transpose(1, 2).reshape(B, S, -1))


def test_gqa_matches_repeat_kv_reference() -> None:
    torch.manual_seed(0)
    attn = Attention(16, num_heads=4, num_kv_heads=2, head_dim=8)
    x = torch.randn(2, 7, 16)
    angles = rope_angles(7, 8, 10000.0)
    cos, sin = angles.cos(), angles.sin()
    torch.testing.assert_close(attn(x, cos, sin), _reference_attention(attn, x, cos, sin), rtol=1e-5, atol=1e-6)


def test_attention_column_sharded_heads() -> None:
    """Tensor-parallel shape: two shards holding half the q and kv heads each (column-split wq/wk/wv,
    row-split wo) sum to the full output; head counts come from shapes, not config."""
    torch.manual_seed(0)
    full = Attention(16, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
    x = torch.randn(2, 5, 16)
    angles = rope_angles(5, 8, 10000.0)
    total = torch.zeros(2, 5, 16)
    for r in range(2):
        shard = Attention(16, num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True)
        with torch.no_grad():
            shard.wq.weight.copy_(full.wq.weight[r * 16 : (r + 1) * 16])
            shard.wk.weight.copy_(full.wk.weight[r * 8 : (r + 1) * 8])
            shard.wv.weight.copy_(full.wv.weight[r * 8 : (r + 1) * 8])
            shard.wo.weight.copy_(full.wo.weight[:, r * 16 : (r + 1) * 16])
        total += shard(x, angles.cos(), angles.sin())
    torch.testing.assert_close(total, full(x, angles.cos(), angles.sin()), rtol=1e-5, atol=1e-6)


def test_rope_relative_position() -> None:
    """<rope(q, m), rope(k, n)> depends on m - n only."""
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)
    angles = rope_angles(32, 8, 10000.0)
    cos, sin = angles.cos(), angles.sin()

    def at(v: torch.Tensor, pos: int) -> torch.Tensor:
        x = torch.zeros(1, 32, 1, 8)
        x[0, pos, 0] = v
        return apply_rope(x, cos, sin)[0, pos, 0]

    d1 = at(q, 5) @ at(k, 2)
    d2 = at(q, 20) @ at(k, 17)
    torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(d1, at(q, 6) @ at(k, 2))  # twin: a different offset changes it
    torch.testing.assert_close(at(q, 0), q)  # position 0 is the identity


def test_rope_cache_grows_lazily() -> None:
    model = _model()
    assert model.rope.cos_SR.shape[0] == 0
    model(_tokens(s=6))
    model(_tokens(s=12))
    assert model.rope.cos_SR.shape[0] == 12
    assert "rope.cos_SR" not in model.state_dict()


MODEL_VARIANTS = [
    (SMALL, SMALL_MOE),
    (dataclasses.replace(SMALL, qk_norm=True, tie_embeddings=True), SMALL_MOE),
    (SMALL, dataclasses.replace(SMALL_MOE, first_k_dense=1, num_shared_experts=2, shared_expert_ffn_hidden_size=4)),
    (dataclasses.replace(SMALL, num_layers=3), dataclasses.replace(SMALL_MOE, first_k_dense=3)),
    (SMALL, dataclasses.replace(SMALL_MOE, num_shared_experts=1)),
]


@pytest.mark.parametrize("model_cfg,moe_cfg", MODEL_VARIANTS)
def test_count_parameters_equals_numel(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
    model = _model(model_cfg, moe_cfg)
    counts = count_parameters(model_cfg, moe_cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    emb = model.tok_embeddings.weight.numel() * (1 if model_cfg.tie_embeddings else 2)
    assert counts.embedding == emb
    experts = [b.moe.experts for b in model.layers.values() if b.moe is not None]
    inactive = sum(
        p.numel() * (moe_cfg.num_experts - moe_cfg.top_k) / moe_cfg.num_experts for e in experts for p in e.parameters()
    )
    assert counts.active == counts.total - inactive


def test_tied_embeddings() -> None:
    cfg = dataclasses.replace(SMALL, tie_embeddings=True)
    model = _model(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    tokens = _tokens()
    model(tokens, tokens).token_loss_BS.mean().backward()
    untied = _model()
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters()) == 40 * 16
    assert model.tok_embeddings.weight.grad is not None


def test_init_deterministic_and_scaled() -> None:
    cfg = dataclasses.replace(SMALL, hidden_size=64, num_layers=8, head_dim=16, init_std=0.05)
    a, b = _model(cfg, seed=3), _model(cfg, seed=3)
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=n)
    torch.manual_seed(7)
    init_weights(a, 0.05)
    torch.manual_seed(7)
    init_weights(b, 0.05)
    torch.testing.assert_close(a.layers["3"].moe.experts.w2_EFH, b.layers["3"].moe.experts.w2_EFH, rtol=0, atol=0)
    out_std = 0.05 / math.sqrt(16)
    assert a.layers["0"].attention.wo.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert a.layers["0"].attention.wq.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert a.layers["0"].moe.experts.w2_EFH.std().item() == pytest.approx(out_std, rel=0.1)
    assert torch.equal(a.norm.weight, torch.ones(64))


def test_build_model_seeded() -> None:
    cfg = Config(model=SMALL, moe=SMALL_MOE)
    a, b = build_model(cfg), build_model(cfg)
    torch.testing.assert_close(a.output.weight, b.output.weight, rtol=0, atol=0)
    assert a.rope.cos_SR.shape[0] == cfg.train.seq_len


def test_pipeline_stages_compose() -> None:
    """Pruned copies (stage 0: embeddings + layer 0; stage 1: layer 1 + head) reproduce the full model."""
    model = _model()
    tokens = _tokens()
    with torch.no_grad():
        full = model(tokens).logits_BSV
        s0, s1 = _model(), _model()
        del s0.layers["1"]
        s0.norm, s0.output = None, None
        del s1.layers["0"]
        s1.tok_embeddings = None
        h = s0.head(s0.run_layers(s0.embed(tokens)))
        staged = s1.head(s1.run_layers(s1.embed(h)))
    torch.testing.assert_close(staged, full)


def test_bf16_autocast() -> None:
    model = _model(dataclasses.replace(SMALL, qk_norm=True))
    tokens = _tokens(s=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, tokens, return_logits=True)
        routing = model.layers["0"].moe.router(torch.randn(4, 16, dtype=torch.bfloat16))
    assert out.logits_BSV.dtype == torch.bfloat16
    assert out.token_loss_BS.dtype == torch.float32
    assert routing.topk_weight_TK.dtype == torch.float32 and routing.prob_sum_E.dtype == torch.float32
    assert torch.isfinite(out.token_loss_BS).all()
    out.token_loss_BS.mean().backward()
    assert model.layers["1"].moe.experts.w1_EHF.grad.dtype == torch.float32


def test_ignore_index_labels() -> None:
    model = _model()
    tokens = _tokens()
    labels = tokens.clone()
    labels[:, :3] = -100
    loss = model(tokens, labels).token_loss_BS
    assert (loss[:, :3] == 0).all() and (loss[:, 3:] > 0).all()


def test_flops_per_token_hand_formula() -> None:
    m = ModelConfig(
        hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, vocab_size=10, ffn_hidden_size=6
    )
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=3, first_k_dense=1, num_shared_experts=1)
    attn = 8 * 8 + 2 * 8 * 4 + 8 * 8  # wq, wk, wv, wo
    dense = 3 * 8 * 6
    moe_active = 8 * 4 + 2 * 3 * 8 * 3 + 3 * 8 * 3  # router, 2 routed experts, 1 shared
    n = 2 * attn + dense + moe_active + 10 * 8  # + output layer
    expected = 6 * n + 6 * 2 * 2 * 4 * 16
    assert flops_per_token(m, moe, seq_len=16) == expected


def test_all_dense_layers() -> None:
    model = _model(SMALL, dataclasses.replace(SMALL_MOE, first_k_dense=SMALL.num_layers))
    out = model(_tokens())
    assert out.lbl.item() == 0.0 and out.tokens_per_expert_LE.numel() == 0
    assert all(b.moe is None and b.feed_forward is not None for b in model.layers.values())
