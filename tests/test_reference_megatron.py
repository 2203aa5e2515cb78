"""Our token permute/unpermute against Megatron-Core's reference implementation (moe_utils)."""

from __future__ import annotations

import warnings

import pytest
import torch

from moe_train.kernels import HAS_EXTENSION, permute_rows
from moe_train.model.moe.dispatcher import TokenDispatcher
from moe_train.model.moe.router import TopKRouter

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")


def _routing(num_tokens: int = 50, hidden: int = 16, experts: int = 8, top_k: int = 2):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    router = TopKRouter(hidden, experts, top_k, "softmax", norm_topk_prob=True)
    x_TH = torch.randn(num_tokens, hidden)
    routing = router(x_TH)
    routing_map_TE = torch.zeros(num_tokens, experts, dtype=torch.bool)
    routing_map_TE.scatter_(1, routing.topk_idx_TK, True)
    probs_TE = torch.zeros(num_tokens, experts).scatter(1, routing.topk_idx_TK, routing.topk_weight_TK.detach())
    return x_TH, routing, routing_map_TE, probs_TE


def test_dispatch_equals_megatron_permute_bitwise() -> None:
    x_TH, routing, routing_map_TE, _ = _routing()
    ours_NH, counts_E, _ = TokenDispatcher(8).dispatch(x_TH, routing)
    theirs_NH, _, _ = moe_utils.permute(x_TH, routing_map_TE)
    assert torch.equal(ours_NH, theirs_NH)
    assert torch.equal(counts_E, routing_map_TE.sum(0))


def test_combine_equals_megatron_unpermute() -> None:
    x_TH, routing, routing_map_TE, probs_TE = _routing()
    dispatcher = TokenDispatcher(8)
    x_sorted_NH, _, ctx = dispatcher.dispatch(x_TH, routing)
    y_sorted_NH = x_sorted_NH * 3.0 - 1.0
    ours_TH = dispatcher.combine(y_sorted_NH, ctx)
    _, _, sorted_indices = moe_utils.permute(x_TH, routing_map_TE)
    theirs_TH = moe_utils.unpermute(y_sorted_NH, sorted_indices, x_TH.shape, probs=probs_TE, routing_map=routing_map_TE)
    torch.testing.assert_close(ours_TH, theirs_TH, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HAS_EXTENSION, reason="C++ extension not built")
def test_cpp_permute_equals_megatron_permute() -> None:
    x_TH, routing, routing_map_TE, _ = _routing()
    _, _, ctx = TokenDispatcher(8).dispatch(x_TH, routing)
    theirs_NH, _, _ = moe_utils.permute(x_TH, routing_map_TE)
    assert torch.equal(permute_rows(x_TH, ctx.token_idx_N), theirs_NH)
