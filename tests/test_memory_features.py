"""Activation recompute, the chunked head + loss, fewer host syncs and the compute-time fused GEMMs,
on one process (their parallel layouts are in test_parallel_parity.py).

Legend: B batch, S sequence, H hidden, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from parity import BASE, SyncCounter, train_steps

from moe_train.config import ConfigError, load_config
from moe_train.model import build_model
from moe_train.model.loss import IGNORE_INDEX, chunked_linear_cross_entropy
from moe_train.model.recompute import ReplayLog
from moe_train.model.transformer import set_loss_chunking, set_recompute, token_cross_entropy


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# Chunked head + cross entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_equals_full_logits_loss_and_grads(chunk: int) -> None:
    torch.manual_seed(0)
    B, S, H, V = 3, 11, 16, 50
    h_BSH = torch.randn(B, S, H, requires_grad=True)
    w_VH = (torch.randn(V, H) * 0.3).requires_grad_()
    labels_BS = torch.randint(0, V, (B, S))
    labels_BS[0, :4] = IGNORE_INDEX
    grad_BS = torch.rand(B, S)  # a non-uniform upstream gradient
    want_BS = token_cross_entropy(h_BSH @ w_VH.t(), labels_BS)
    (want_BS * grad_BS).sum().backward()
    want_h, want_w = h_BSH.grad.clone(), w_VH.grad.clone()
    h_BSH.grad = w_VH.grad = None
    got_BS = chunked_linear_cross_entropy(h_BSH, w_VH, labels_BS, chunk)
    (got_BS * grad_BS).sum().backward()
    torch.testing.assert_close(got_BS, want_BS, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h_BSH.grad, want_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w_VH.grad, want_w, rtol=1e-5, atol=1e-7)
    assert (got_BS[0, :4] == 0).all()


def test_chunked_loss_in_the_model_matches_and_never_builds_logits() -> None:
    cfg = load_config(None, [*BASE, "model.tie_embeddings=true"])
    tokens_BS = torch.randint(0, cfg.model.vocab_size, (2, 16))
    labels_BS = torch.roll(tokens_BS, -1, 1)
    results = []
    for chunk in (0, 5):
        model = build_model(cfg)
        set_loss_chunking(model, chunk)
        out = model(tokens_BS, labels_BS)
        out.token_loss_BS.mean().backward()
        results.append((out.token_loss_BS.detach(), _grads(model), out.logits_BSV))
    (want, want_grads, _), (got, got_grads, logits) = results
    assert logits is None
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_config_rejects_bad_memory_options() -> None:
    with pytest.raises(ConfigError, match="train.recompute"):
        load_config(None, ["train.recompute=some"])
    with pytest.raises(ConfigError, match="train.loss_chunk_tokens"):
        load_config(None, ["train.loss_chunk_tokens=-1"])


# ---------------------------------------------------------------------------------------------
# Activation recompute: same numbers, router statistics counted once


STREAMING = ["moe.lbl.scope=global", "moe.lbl.global_mode=streaming"]
"""The LBL mode whose per-forward state (running counts) a replayed forward would corrupt."""


@pytest.fixture(scope="module")
def recompute_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("recompute")
    return {
        mode: train_steps(root / mode, [*STREAMING, f"train.recompute={mode}"], 2)
        for mode in ("none", "selective", "full")
    }


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_matches_no_recompute(recompute_runs: dict[str, dict[str, Any]], mode: str) -> None:
    """Losses, LBL, z-loss, grad norm, routing counts of every step and final parameters (streaming
    global LBL: the mode whose per-forward running counts a replayed forward would corrupt)."""
    want, got = recompute_runs["none"], recompute_runs[mode]
    for step, (a, b) in enumerate(zip(got["records"], want["records"], strict=True)):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), f"step {step}"
    for step, (a, b) in enumerate(zip(got["counts"], want["counts"], strict=True)):
        assert torch.equal(a, b), f"routing counts differ at step {step}"
    for name, p in want["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-6, atol=1e-7, msg=name)


def _one_step_counts(mode: str) -> tuple[list[int], list[float], dict[str, torch.Tensor]]:
    """Two micro-batches' forward + backward inside a step (streaming global LBL): per MoE layer how
    many forwards it recorded, each forward's reported LBL, and the gradients."""
    from moe_train.model.moe.layer import MoELayer

    cfg = load_config(None, [*BASE, *STREAMING])
    model = build_model(cfg)
    set_recompute(model, mode)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    gen = torch.Generator().manual_seed(1)
    for layer in layers:
        layer.balance.start_step(4 * 32, 32)
    lbls = []
    for _ in range(2):  # the second forward's LBL uses the first one's running counts
        tokens_BS = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=gen)
        out = model(tokens_BS, torch.roll(tokens_BS, -1, 1))
        out.token_loss_BS.mean().backward()
        lbls.append(float(out.lbl))
    return [len(layer.balance.seq_counts) for layer in layers], lbls, _grads(model)


def test_recompute_without_the_guard_double_counts() -> None:
    """The twin: with the replay guard off, full recompute records every routing twice (Megatron
    #1330) and the streaming global LBL's running counts include the replays, so the next forward's
    LBL is wrong. (Its gradient here happens to survive: the running-mean f is a ratio of counts to
    tokens, both doubled by the replay of the same forward.)"""
    want_counts, want_lbls, want_grads = _one_step_counts("none")
    got_counts, got_lbls, got_grads = _one_step_counts("full")
    original = ReplayLog.once
    ReplayLog.once = lambda self, fn: fn()  # type: ignore[method-assign]  # the guard off
    try:
        bad_counts, bad_lbls, _ = _one_step_counts("full")
    finally:
        ReplayLog.once = original  # type: ignore[method-assign]
    assert want_counts == got_counts == [2] * len(want_counts)
    assert got_lbls == pytest.approx(want_lbls, rel=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-6, atol=1e-8, msg=name)
    assert bad_counts == [4] * len(want_counts)
    assert bad_lbls[0] == pytest.approx(want_lbls[0], rel=1e-6)
    assert bad_lbls[1] != pytest.approx(want_lbls[1], rel=1e-4)


def test_recompute_frees_activations() -> None:
    """Full recompute keeps fewer saved tensors for backward than none (the memory it exists for)."""
    cfg = load_config(None, BASE)
    tokens_BS = torch.randint(0, cfg.model.vocab_size, (2, 16))
    saved: dict[str, int] = {}
    for mode in ("none", "selective", "full"):
        model = build_model(cfg)
        set_recompute(model, mode)
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(tokens_BS, torch.roll(tokens_BS, -1, 1))
        out.token_loss_BS.mean().backward()
        saved[mode] = total
    assert saved["full"] < saved["selective"] < saved["none"], saved


# ---------------------------------------------------------------------------------------------
# Host syncs


@pytest.mark.parametrize("grouped_mm", [True, False])
def test_forward_backward_host_syncs(tmp_path: Path, grouped_mm: bool) -> None:
    """forward_backward of M micro-batches through L MoE layers: its statistics stay on the device (the
    trainer reads them back once per step, below); per MoE layer forward no host sync with the grouped
    GEMM (offsets stay on the device), one (the split sizes, not one per expert) with the per-expert loop."""
    from moe_train.model.moe.experts import GroupedExperts
    from moe_train.train.step import forward_backward
    from moe_train.train.trainer import Trainer

    cfg = load_config(None, [*BASE, f"run.dir={tmp_path}"])
    trainer = Trainer(cfg)
    for m in trainer.model.modules():
        if isinstance(m, GroupedExperts):
            m.grouped_mm = grouped_mm
    batches = trainer.micro_batches(0)
    num_moe = cfg.model.num_layers - cfg.moe.first_k_dense
    with SyncCounter() as counter:
        forward_backward(trainer.pmodel, batches, trainer.device, trainer._autocast(), 3)
    per_layer = 0 if grouped_mm else len(batches) * num_moe
    assert counter.calls == ({"tolist": per_layer} if per_layer else {}), counter.calls  # statistics stay
    with SyncCounter() as sanity:  # the counter sees a sync when there is one
        float(torch.ones(()))
    assert sanity.total == 1


@pytest.mark.parametrize(
    "extra",
    [[], ["moe.lbl.scope=global", "moe.lbl.global_mode=exact", "moe.bias_update_rate=0.01"]],
    ids=["default", "exact-global-lbl+expert-bias"],
)
def test_train_step_has_one_host_sync(tmp_path: Path, extra: list[str]) -> None:
    """A whole Trainer.train_step (forward/backward, clip, anomaly screen, optimizer, routing counts,
    expert-bias update) copies device values to the host once: losses, counts, grad norm and routing
    statistics travel in one packed tensor. Twin: the counter sees the old per-value reads."""
    import moe_train.train.trainer as trainer_module
    from moe_train.train.checkpoint import TrainState
    from moe_train.train.trainer import Trainer

    cfg = load_config(None, [*BASE, f"run.dir={tmp_path}", *extra])
    trainer = Trainer(cfg)
    trainer.train_step()  # first step: lazy state (optimizer moments, caches) is built outside the count
    trainer.state = TrainState(1, cfg.train.global_batch_size)
    with SyncCounter(host_tensors=(trainer_module, "read_back")) as counter:
        result = trainer.train_step()
    assert counter.calls == {"cpu": 1}, counter.calls
    assert result.grad_norm > 0 and result.routing_counts_LDE is not None
    with SyncCounter(host_tensors=(trainer_module, "read_back")) as twin:
        trainer._clip().item()  # what the step did before: the grad norm read on its own
    assert twin.calls == {"item": 1}


# ---------------------------------------------------------------------------------------------
# Fused GEMMs (compute-time: the parameters keep their names and shapes)


@pytest.mark.parametrize("variant", ["fused", "loop"])
def test_fused_gemms_give_the_same_loss_and_grads(variant: str) -> None:
    """Compute-time fusions (q|k|v, w1|w3 per expert and dense) and the per-expert loop instead of the
    grouped GEMM: same loss and gradients, same parameter names."""
    cfg = load_config(None, [*BASE, "model.qk_norm=true"])
    tokens_BS = torch.randint(0, cfg.model.vocab_size, (2, 16))
    runs = []
    for on in (False, True):
        model = build_model(cfg)
        for m in model.modules():
            for attr in ("fuse_qkv", "fuse_gate_up") if variant == "fused" else ("grouped_mm",):
                if hasattr(m, attr):
                    setattr(m, attr, on if variant == "fused" else not on)
        out = model(tokens_BS, torch.roll(tokens_BS, -1, 1))
        out.token_loss_BS.mean().backward()
        runs.append((out.token_loss_BS.detach(), _grads(model), [n for n, _ in model.named_parameters()]))
    (want, want_grads, want_names), (got, got_grads, got_names) = runs
    assert got_names == want_names
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
