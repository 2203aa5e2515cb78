"""MoE layer, router and aux losses against plain references.

Legend: B batch, S sequence, T tokens, H hidden, E experts, K top_k.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_train.config import LBLConfig, ModelConfig, MoEConfig
from moe_train.model import (
    GroupedExperts,
    MoELayer,
    MoETransformer,
    TopKRouter,
    collect_moe_stats,
    expert_capacity,
    load_balancing_loss,
    router_z_loss,
    set_aux_loss_scale,
)

H, E, K, F_EXPERT = 12, 4, 2, 10


def _moe_cfg(**kw: object) -> MoEConfig:
    base: dict[str, object] = dict(
        num_experts=E, top_k=K, expert_ffn_hidden_size=F_EXPERT, lbl=LBLConfig(coeff=0.0), zloss_coeff=0.0
    )
    base.update(kw)
    return MoEConfig(**base)  # type: ignore[arg-type]


def _make_layer(moe_cfg: MoEConfig, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(H, moe_cfg, num_moe_layers=1)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    return layer


def _reference_choices(layer: MoELayer, x_TH: torch.Tensor, moe_cfg: MoEConfig) -> list[list[tuple]]:
    """Per token: [(expert, raw score, combine weight)], decided one token at a time."""
    choices = []
    for t in range(x_TH.shape[0]):
        logits_E = layer.router.gate.weight @ x_TH[t]
        scores_E = logits_E.softmax(-1) if moe_cfg.score_func == "softmax" else logits_E.sigmoid()
        chosen = sorted(range(E), key=lambda e: -scores_E[e].item())[:K]
        total = sum(scores_E[e] for e in chosen)
        choices.append(
            [(e, scores_E[e], scores_E[e] / total if moe_cfg.norm_topk_prob else scores_E[e]) for e in chosen]
        )
    return choices


def _reference_kept(choices: list[list[tuple]], moe_cfg: MoEConfig) -> set[tuple[int, int]]:
    """(token, expert) assignments that survive capacity, by the stated policy in plain Python."""
    T = len(choices)
    kept = {(t, e) for t in range(T) for e, _, _ in choices[t]}
    if moe_cfg.capacity_factor is None:
        return kept
    cap = math.ceil(moe_cfg.capacity_factor * T * K / E)
    kept = set()
    for e in range(E):
        cands = [(t, s.item()) for t in range(T) for ee, s, _ in choices[t] if ee == e]
        if moe_cfg.drop_policy == "position":
            cands.sort(key=lambda c: c[0])
        else:
            cands.sort(key=lambda c: -c[1])
        kept |= {(t, e) for t, _ in cands[:cap]}
    return kept


def _reference_moe(layer: MoELayer, x_TH: torch.Tensor, moe_cfg: MoEConfig) -> tuple[torch.Tensor, set]:
    """Loop over tokens: each token through its kept top-k experts, weighted sum, plus shared experts."""
    choices = _reference_choices(layer, x_TH, moe_cfg)
    kept = _reference_kept(choices, moe_cfg)
    ex = layer.experts
    rows = []
    for t in range(x_TH.shape[0]):
        y_H = torch.zeros(H)
        for e, _, w in choices[t]:
            if (t, e) in kept:
                h_F = F.silu(x_TH[t] @ ex.w1_EHF[e]) * (x_TH[t] @ ex.w3_EHF[e])
                y_H = y_H + w * (h_F @ ex.w2_EFH[e])
        if layer.shared_experts is not None:
            y_H = y_H + layer.shared_experts(x_TH[t])
        rows.append(y_H)
    return torch.stack(rows), kept


CASES = [
    dict(score_func="softmax", num_shared_experts=1),
    dict(score_func="sigmoid"),
    dict(score_func="sigmoid", norm_topk_prob=False, num_shared_experts=2, shared_expert_ffn_hidden_size=6),
    dict(score_func="softmax", capacity_factor=0.5, drop_policy="probs", num_shared_experts=1),
    dict(score_func="softmax", capacity_factor=0.5, drop_policy="position"),
    dict(score_func="sigmoid", capacity_factor=0.75, drop_policy="probs", num_shared_experts=1),
    dict(score_func="sigmoid", capacity_factor=0.75, drop_policy="position", norm_topk_prob=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_moe_layer_matches_per_token_reference(case: dict) -> None:
    moe_cfg = _moe_cfg(**case)
    layer = _make_layer(moe_cfg)
    torch.manual_seed(1)
    x_BSH = torch.randn(2, 8, H, requires_grad=True)
    g_BSH = torch.randn(2, 8, H)
    params = dict(layer.named_parameters())

    y_BSH = layer(x_BSH)
    grads = torch.autograd.grad((y_BSH * g_BSH).sum(), [x_BSH, *params.values()])
    y_ref_TH, kept = _reference_moe(layer, x_BSH.reshape(-1, H), moe_cfg)
    grads_ref = torch.autograd.grad((y_ref_TH * g_BSH.reshape(-1, H)).sum(), [x_BSH, *params.values()])

    torch.testing.assert_close(y_BSH.reshape(-1, H), y_ref_TH, rtol=1e-5, atol=1e-6)
    for name, g, g_ref in zip(["x", *params], grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"grad {n}: {m}")
    if moe_cfg.capacity_factor is not None:  # the case must actually drop something
        assert len(kept) < 16 * K


def test_drop_policies_differ_and_capacity_changes_output() -> None:
    """Twin of the reference test: the policy and the capacity visibly matter on this input."""
    torch.manual_seed(1)
    x_BSH = torch.randn(2, 8, H)
    outs = {}
    for cf, policy in [(None, "probs"), (0.5, "probs"), (0.5, "position")]:
        moe_cfg = _moe_cfg(capacity_factor=cf, drop_policy=policy)
        with torch.no_grad():
            outs[(cf, policy)] = _make_layer(moe_cfg)(x_BSH)
    assert not torch.allclose(outs[(None, "probs")], outs[(0.5, "probs")])
    assert not torch.allclose(outs[(0.5, "probs")], outs[(0.5, "position")])


def test_expert_capacity() -> None:
    assert expert_capacity(1.25, 10, 2, 4) == 7  # ceil(6.25)
    assert expert_capacity(1.0, 16, 2, 4) == 8
    assert expert_capacity(0.1, 3, 1, 8) == 1


def _router_with_logits(logits: list[list[float]], score_func: str, norm: bool) -> tuple[TopKRouter, torch.Tensor]:
    """A router whose gate is the identity, fed x = logits, so router logits are exactly `logits`."""
    n = len(logits[0])
    router = TopKRouter(n, n, top_k=2, score_func=score_func, norm_topk_prob=norm)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(n))
    return router, torch.tensor(logits)


def test_softmax_router_lbl_zloss_hand_values() -> None:
    router, x = _router_with_logits([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]], "softmax", norm=True)
    r = router(x)
    z0 = math.e + math.e**2 + 1.0
    z1 = math.exp(0.5) + math.exp(-1.0) + math.exp(3.0)
    p0 = [math.e / z0, math.e**2 / z0, 1.0 / z0]
    p1 = [math.exp(0.5) / z1, math.exp(-1.0) / z1, math.exp(3.0) / z1]
    assert r.topk_idx_TK.tolist() == [[1, 0], [2, 0]]
    w_expected = [
        [p0[1] / (p0[1] + p0[0]), p0[0] / (p0[1] + p0[0])],
        [p1[2] / (p1[2] + p1[0]), p1[0] / (p1[2] + p1[0])],
    ]
    torch.testing.assert_close(r.topk_weight_TK, torch.tensor(w_expected))
    assert r.tokens_per_expert_E.tolist() == [2, 1, 1]
    # LBL = E * sum_i f_i * P_i, f = counts / (T*k) = [2/4, 1/4, 1/4], P = mean prob over tokens
    f = [0.5, 0.25, 0.25]
    lbl_expected = 3 * sum(f[i] * (p0[i] + p1[i]) / 2 for i in range(3))
    lbl = load_balancing_loss(r.tokens_per_expert_E, r.prob_sum_E, r.num_tokens, 2)
    assert lbl.item() == pytest.approx(lbl_expected, rel=1e-6)
    z_expected = (math.log(z0) ** 2 + math.log(z1) ** 2) / 2
    assert r.z_loss.item() == pytest.approx(z_expected, rel=1e-6)
    assert router_z_loss(x).item() == pytest.approx(z_expected, rel=1e-6)


def test_sigmoid_router_hand_values() -> None:
    router, x = _router_with_logits([[0.0, 2.0, -1.0, 1.0]], "sigmoid", norm=False)
    r = router(x)
    s = [1 / (1 + math.exp(-v)) for v in [0.0, 2.0, -1.0, 1.0]]
    assert r.topk_idx_TK.tolist() == [[1, 3]]
    torch.testing.assert_close(r.topk_weight_TK, torch.tensor([[s[1], s[3]]]))  # no renormalisation
    p = [v / sum(s) for v in s]  # LBL's P uses per-token normalised sigmoid scores
    torch.testing.assert_close(r.prob_sum_E, torch.tensor(p))
    lbl = load_balancing_loss(r.tokens_per_expert_E, r.prob_sum_E, r.num_tokens, 2)
    assert lbl.item() == pytest.approx(4 * (0.5 * p[1] + 0.5 * p[3]), rel=1e-6)


def test_lbl_uniform_is_one_and_counts_get_no_grad() -> None:
    counts_E = torch.tensor([3, 3, 3, 3])
    prob_sum_E = torch.full((4,), 6 * 0.25, requires_grad=True)  # 6 tokens, uniform probabilities
    lbl = load_balancing_loss(counts_E, prob_sum_E, 6, 2)
    assert lbl.item() == pytest.approx(1.0)
    lbl.backward()
    torch.testing.assert_close(prob_sum_E.grad, torch.full((4,), 4 * 3 / 12 / 6))


def test_grouped_experts_expert_parallel_shard() -> None:
    """A module holding experts 2..3 only (as an EP rank would) gives the full module's rows for them."""
    torch.manual_seed(0)
    full = GroupedExperts(4, H, F_EXPERT)
    shard = GroupedExperts(2, H, F_EXPERT)
    with torch.no_grad():
        for name in ("w1_EHF", "w3_EHF", "w2_EFH"):
            getattr(shard, name).copy_(getattr(full, name)[2:])
    counts = torch.tensor([3, 0, 2, 4])
    x_NH = torch.randn(int(counts.sum()), H)
    torch.testing.assert_close(shard(x_NH[3:], counts[2:]), full(x_NH, counts)[3:])


# ---------------------------------------------------------------------------------------------
# Aux-loss attachment on a full model

MODEL = ModelConfig(hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8, vocab_size=32)


def _model(lbl_coeff: float, zloss_coeff: float) -> MoETransformer:
    moe = MoEConfig(
        num_experts=E,
        top_k=K,
        expert_ffn_hidden_size=8,
        first_k_dense=1,
        lbl=LBLConfig(coeff=lbl_coeff),
        zloss_coeff=zloss_coeff,
    )
    torch.manual_seed(0)
    return MoETransformer(MODEL, moe)


def _grads(model: MoETransformer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _explicit_aux(x_TH: torch.Tensor, gate_EH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch LBL and ST-MoE z-loss written out from the router input."""
    logits_TE = x_TH @ gate_EH.T
    probs_TE = logits_TE.softmax(-1)
    counts_E = F.one_hot(probs_TE.topk(K, -1).indices, E).sum((0, 1)).float()
    T = x_TH.shape[0]
    lbl = E * ((counts_E / (T * K)) * probs_TE.mean(0)).sum()
    return lbl, torch.logsumexp(logits_TE, -1).pow(2).mean()


def test_aux_loss_attach_equals_explicit_total_loss() -> None:
    c_lbl, c_z, scale = 0.1, 0.01, 0.5
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(tokens, -1, 1)

    attached = _model(c_lbl, c_z)
    set_aux_loss_scale(attached, scale)
    out = attached(tokens, labels)
    (out.token_loss_BS.mean() * scale).backward()

    explicit = _model(0.0, 0.0)
    explicit.load_state_dict(attached.state_dict())
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    for block in explicit.layers.values():
        if block.moe is not None:
            router = block.moe.router
            router.register_forward_hook(lambda m, args, _o: captured.append((args[0], m.gate.weight)))
    out_e = explicit(tokens, labels)
    aux = [_explicit_aux(x, w) for x, w in captured]
    assert len(aux) == 2
    lbl_mean = sum(a[0] for a in aux) / 2
    z_mean = sum(a[1] for a in aux) / 2
    (scale * (out_e.token_loss_BS.mean() + c_lbl * lbl_mean + c_z * z_mean)).backward()

    torch.testing.assert_close(out.lbl, lbl_mean.detach())
    torch.testing.assert_close(out.zloss, z_mean.detach())
    g_att, g_exp = _grads(attached), _grads(explicit)
    assert g_att.keys() == g_exp.keys()
    for name in g_att:
        torch.testing.assert_close(g_att[name], g_exp[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")

    # Twin: the LM-only gradient differs in the routers, so the comparison above can fail.
    explicit.zero_grad()
    explicit(tokens, labels).token_loss_BS.mean().mul(scale).backward()
    gate = "layers.1.moe.router.gate.weight"
    assert not torch.allclose(_grads(explicit)[gate], g_att[gate], rtol=1e-3, atol=0)


def test_aux_loss_with_zero_coeff_gives_lm_only_grads() -> None:
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(tokens, -1, 1)
    zero = _model(0.0, 0.0)
    zero(tokens, labels).token_loss_BS.mean().backward()
    # same weights, lm loss only, with the aux hooks switched off by a zero scale
    ref = _model(0.1, 0.01)
    set_aux_loss_scale(ref, 0.0)
    ref(tokens, labels).token_loss_BS.mean().backward()
    g_zero, g_ref = _grads(zero), _grads(ref)
    for name in g_zero:
        torch.testing.assert_close(g_zero[name], g_ref[name], rtol=1e-6, atol=1e-8)


def test_moe_stats_and_pipeline_stage_subset() -> None:
    model = _model(0.1, 0.0)
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(5))
    out = model(tokens)
    assert out.tokens_per_expert_LE.shape == (2, E)
    assert out.tokens_per_expert_LE.sum(1).tolist() == [16 * K, 16 * K]
    stats = collect_moe_stats(model)
    assert list(stats) == [1, 2]
    torch.testing.assert_close(out.lbl, (stats[1].lbl + stats[2].lbl) / 2)
    # a "last stage" holding only layer 2: its stats are found by layer id
    h_BSH = model.run_layers(model.embed(tokens)).detach()
    del model.layers["0"], model.layers["1"]
    model.layers["2"].moe.last_stats = None
    model.run_layers(h_BSH)
    assert list(collect_moe_stats(model)) == [2]
