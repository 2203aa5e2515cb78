"""Our token permute/unpermute against Megatron-Core's reference implementation (moe_utils), element for
element (bitwise: the same stable order, the same fp32 products and the same summation order).

Legend: T tokens, H hidden, E experts, K top_k.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from moe_train.kernels import HAS_EXTENSION, permute, unpermute
from moe_train.model.moe.dispatcher import TokenDispatcher
from moe_train.model.moe.router import TopKRouter

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")

BACKENDS = ["torch", "auto"]
if HAS_EXTENSION or os.environ.get("MOE_TRAIN_REQUIRE_EXT") == "1":
    BACKENDS.append("cpu")
SHAPES = [(300, 8, 2, 64), (513, 64, 8, 96), (50, 16, 4, 130), (1, 4, 1, 5)]  # T, E, K, H


def _random_routing(T: int, E: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_idx_TK (K distinct experts per token, in score order) and renormalised probs_TK."""
    gen = torch.Generator().manual_seed(seed)
    scores_TE = torch.rand(T, E, generator=gen)
    top_TK = scores_TE.topk(K, dim=-1)
    return top_TK.indices, top_TK.values / top_TK.values.sum(-1, keepdim=True)


def _megatron_maps(idx_TK: torch.Tensor, probs_TK: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    routing_map_TE = torch.zeros(idx_TK.shape[0], E, dtype=torch.bool).scatter_(1, idx_TK, True)
    return routing_map_TE, torch.zeros(idx_TK.shape[0], E).scatter(1, idx_TK, probs_TK)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_and_unpermute_equal_megatron(backend: str, dtype: torch.dtype) -> None:
    for seed, (T, E, K, H) in enumerate(SHAPES):
        idx_TK, probs_TK = _random_routing(T, E, K, seed)
        routing_map_TE, probs_TE = _megatron_maps(idx_TK, probs_TK, E)
        x_TH = torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).to(dtype)
        ours = permute(x_TH, idx_TK, E, backend=backend)
        theirs_NH, _, sorted_indices = moe_utils.permute(x_TH, routing_map_TE)
        assert torch.equal(ours.rows, theirs_NH), (T, E, K, H)
        assert torch.equal(ours.tokens_per_expert, routing_map_TE.sum(0))
        y_NH = (theirs_NH.float() * 3.0 - 1.0).to(dtype)
        got_TH = unpermute(y_NH, ours.row_map, probs_TK, backend=backend)
        want_TH = moe_utils.unpermute(y_NH, sorted_indices, x_TH.shape, probs=probs_TE, routing_map=routing_map_TE)
        assert got_TH.dtype == want_TH.dtype == dtype
        assert torch.equal(got_TH, want_TH), (T, E, K, H, (got_TH.float() - want_TH.float()).abs().max())
        got_sum = unpermute(y_NH, ours.row_map, backend=backend)
        assert torch.equal(got_sum, moe_utils.unpermute(y_NH, sorted_indices, x_TH.shape))


def test_megatron_sum_order_matters() -> None:
    """Twin: summing a token's rows in another order (k order instead of ascending rows) is not bitwise
    equal, so the equality above pins the order down."""
    T, E, K, H = 513, 64, 8, 96
    idx_TK, probs_TK = _random_routing(T, E, K, 1)
    routing_map_TE, probs_TE = _megatron_maps(idx_TK, probs_TK, E)
    x_TH = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    ours = permute(x_TH, idx_TK, E, backend="torch")
    _, _, sorted_indices = moe_utils.permute(x_TH, routing_map_TE)
    want_TH = moe_utils.unpermute(ours.rows, sorted_indices, x_TH.shape, probs=probs_TE, routing_map=routing_map_TE)
    k_order_TH = torch.zeros(T, H)
    for k in range(K):
        k_order_TH += ours.rows[ours.row_map[:, k]] * probs_TK[:, k : k + 1]
    torch.testing.assert_close(k_order_TH, want_TH)  # equal up to rounding ...
    assert not torch.equal(k_order_TH, want_TH)  # ... but not bitwise


def test_dispatcher_equals_megatron() -> None:
    """The MoE layer's TokenDispatcher (router -> dispatch -> combine) on Megatron-Core's reference."""
    torch.manual_seed(0)
    T, H, E, K = 50, 16, 8, 2
    router = TopKRouter(H, E, K, "softmax", norm_topk_prob=True)
    x_TH = torch.randn(T, H)
    routing = router(x_TH)
    routing_map_TE, probs_TE = _megatron_maps(routing.topk_idx_TK, routing.topk_weight_TK.detach(), E)
    dispatcher = TokenDispatcher(E)
    ours_NH, counts_E, ctx = dispatcher.dispatch(x_TH, routing)
    theirs_NH, _, sorted_indices = moe_utils.permute(x_TH, routing_map_TE)
    assert torch.equal(ours_NH, theirs_NH) and torch.equal(counts_E, routing_map_TE.sum(0))
    y_sorted_NH = ours_NH * 3.0 - 1.0
    want_TH = moe_utils.unpermute(y_sorted_NH, sorted_indices, x_TH.shape, probs=probs_TE, routing_map=routing_map_TE)
    assert torch.equal(dispatcher.combine(y_sorted_NH, ctx), want_TH)
