"""Expert parallelism (EP, ETP) and sequence-parallel router statistics against the single-device model.

One spawn of 4 gloo ranks runs every layout (ep2, ep4, ep2·etp2, tp2·ep2 folded, tp2 with ep1) and
compares, per rank, the MoE layer (and for tp == 1 the full model) with the single-device reference:
outputs, aux statistics (LBL, z-loss, counts) and gradients, in dropless and capacity (tp == 1) modes,
with softmax and sigmoid routers. DP rank d's micro-batch is the reference run on d's tokens; the
expected gradient is the sum over replicas of the per-replica reference gradients divided by dp, and
each rank's local gradient is summed over its ParamMeta.grad_sum_kinds and divided by dp.

Legend: B batch, S sequence, H hidden, E experts, T tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from distributed import run_checks, run_distributed  # tests/distributed.py

from moe_train.config import Config, LBLConfig, ModelConfig, MoEConfig, ParallelConfig, TrainConfig
from moe_train.model import MoELayer, build_model
from moe_train.parallel.expert_parallel import (
    AllToAllDispatcher,
    apply_expert_parallel,
    inverse_permutation,
    regroup_index,
)
from moe_train.parallel.groups import ProcessGroups, groups_from_layout
from moe_train.parallel.layout import rank_layout
from moe_train.parallel.param_meta import get_meta, set_meta, shard_slice
from moe_train.parallel.tensor_parallel import apply_tensor_parallel

WORLD = 4
H, E, K, F_EXPERT, B, S = 16, 8, 2, 8, 2, 8
RTOL, ATOL = 1e-5, 1e-6

LAYOUTS: dict[str, ParallelConfig] = {
    "ep2": ParallelConfig(ep=2),
    "ep4": ParallelConfig(ep=4),
    "ep2_etp2": ParallelConfig(ep=2, etp=2),
    "tp2_ep2": ParallelConfig(tp=2, ep=2),
    "tp2_ep1": ParallelConfig(tp=2),
}
MODES: dict[str, dict[str, Any]] = {
    "softmax": dict(score_func="softmax"),
    "sigmoid": dict(score_func="sigmoid", norm_topk_prob=False),
    "softmax_cap_probs": dict(score_func="softmax", capacity_factor=1.0, drop_policy="probs"),
    "sigmoid_cap_position": dict(score_func="sigmoid", capacity_factor=1.0, drop_policy="position"),
}
LAYER_CASES = [
    (layout, mode)
    for layout in LAYOUTS
    for mode in MODES
    if "cap" not in mode or LAYOUTS[layout].tp == 1  # capacity is per SP shard under tp > 1
]
MODEL_CASES = [(layout, mode) for layout in ("ep2", "ep4", "ep2_etp2") for mode in ("softmax", "sigmoid_cap_position")]
MODEL_CASES += [("tp2_ep2", "softmax"), ("tp2_ep2", "sigmoid"), ("tp2_ep1", "softmax")]
ZERO_TOKEN_CASES = ["ep4_all_to_rank0", "ep2_etp2_split_by_replica"]


def _moe_cfg(mode: str) -> MoEConfig:
    return MoEConfig(
        num_experts=E,
        top_k=K,
        expert_ffn_hidden_size=F_EXPERT,
        num_shared_experts=1,
        lbl=LBLConfig(coeff=0.5),
        zloss_coeff=0.1,
        **MODES[mode],
    )


def _groups(rank: int, layout: str) -> ProcessGroups:
    return groups_from_layout(rank_layout(WORLD, LAYOUTS[layout]), rank)


# ---------------------------------------------------------------------------------------------
# Comparison helpers (run inside the ranks)


def _close(failures: list[str], what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    try:
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    except AssertionError as err:
        failures.append(f"{what}: {str(err).splitlines()[0]} {str(err).splitlines()[-1]}")


def _local_slice(full: torch.Tensor, name: str, param: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
    """The part of a canonical tensor that this rank's parameter holds (per its ParamMeta)."""
    meta = get_meta(param)
    if meta is None:
        return full
    for kind, dim in meta.shards:
        full = shard_slice(full, dim, getattr(groups, f"{kind}_rank"), groups.size(kind))
    return full


def _reduced_grad(param: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
    """The gradient rule of param_meta: sum over grad_sum_kinds, divide by dp. Parameters without
    metadata are dense; under sequence parallelism (tp > 1) their grads are also summed over tp."""
    assert param.grad is not None
    meta = get_meta(param)
    kinds = meta.grad_sum_kinds if meta is not None else ("dp", "tp") if groups.tp_size > 1 else ("dp",)
    grad = param.grad.clone()
    for kind in kinds:
        groups.all_reduce(grad, kind)
    return grad / groups.dp_size


def _compare_grads(failures: list[str], par: torch.nn.Module, want: dict[str, torch.Tensor], groups: ProcessGroups):
    for name, param in par.named_parameters():
        meta = get_meta(param)
        canonical = meta.canonical_name if meta is not None else name
        _close(
            failures,
            f"grad {canonical}",
            _reduced_grad(param, groups),
            _local_slice(want[canonical], name, param, groups),
        )


def _expected_grads(ref: torch.nn.Module, per_replica: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([g[name] for g in per_replica]).mean(0) for name, _ in ref.named_parameters()}


# ---------------------------------------------------------------------------------------------
# MoE layer alone (SP shards split by hand for tp > 1)


def _make_layer(mode: str, forced_owner_dims: bool = False) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(H, _moe_cfg(mode), num_moe_layers=1)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
        if forced_owner_dims:  # expert e prefers hidden dim (owner of e under ep = 4 or 2, see _forced_x)
            layer.router.gate.weight.mul_(0.1)
            for e in range(E):
                layer.router.gate.weight[e, e * 4 // E] += 3.0
    return layer


def _deepcopy_with_meta(module: MoELayer) -> MoELayer:
    """copy.deepcopy, then re-attach the ParamMeta (torch's Parameter deepcopy drops tensor attributes)."""
    metas = {name: get_meta(p) for name, p in module.named_parameters()}
    clone = copy.deepcopy(module)
    for name, p in clone.named_parameters():
        meta = metas[name]
        if meta is not None:
            set_meta(p, meta)
    return clone


def _replica_data(d: int, forced_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DP replica d's micro-batch x_BSH and the weights of its test loss sum(y * w)."""
    gen = torch.Generator().manual_seed(100 + d)
    x_BSH = torch.randn(B, S, H, generator=gen)
    if forced_dim is not None:
        x_BSH = 0.1 * x_BSH
        x_BSH[..., forced_dim] += 3.0
    return x_BSH, torch.randn(B, S, H, generator=gen)


def _sp_shard(t_BSH: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
    return t_BSH.chunk(groups.tp_size, dim=1)[groups.tp_rank]


def _run_layer(layer: MoELayer, x_BSH: torch.Tensor, w_BSH: torch.Tensor) -> torch.Tensor:
    x_BSH = x_BSH.clone().requires_grad_(True)
    y_BSH = layer(x_BSH)
    (y_BSH * w_BSH).sum().backward()
    return y_BSH.detach()


def _layer_parity(
    rank: int,
    layout: str,
    mode: str,
    forced_dim: Callable[[int], int] | None = None,
    dispatcher_cls: type[AllToAllDispatcher] | None = None,
    stats_reducer: bool = True,
) -> list[str]:
    """Failures (empty = parity) of the EP layer on this rank against the single-device layer."""
    groups = _groups(rank, layout)
    ref = _make_layer(mode, forced_owner_dims=forced_dim is not None)
    par = copy.deepcopy(ref)
    apply_expert_parallel(par, groups)
    par = _deepcopy_with_meta(par)  # pipeline chunks may be deep copies: the dispatcher must survive one
    if dispatcher_cls is not None:
        par.dispatcher = dispatcher_cls(par.dispatcher, groups)
    if not stats_reducer:
        par.stats_reducer = None
    data = [_replica_data(d, None if forced_dim is None else forced_dim(d)) for d in range(groups.dp_size)]
    per_replica, ref_out = [], []
    for x_BSH, w_BSH in data:
        ref.zero_grad()
        y_BSH = _run_layer(ref, x_BSH, w_BSH)
        ref_out.append((y_BSH, ref.last_stats))
        per_replica.append({n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None})
    x_BSH, w_BSH = data[groups.dp_rank]
    y_local = _run_layer(par, _sp_shard(x_BSH, groups), _sp_shard(w_BSH, groups))
    want_y, want_stats = ref_out[groups.dp_rank]
    failures: list[str] = []
    _close(failures, "output", y_local, _sp_shard(want_y, groups))
    assert par.last_stats is not None and want_stats is not None
    _close(failures, "lbl", par.last_stats.lbl, want_stats.lbl)
    _close(failures, "zloss", par.last_stats.zloss, want_stats.zloss)
    if not torch.equal(par.last_stats.tokens_per_expert_E, want_stats.tokens_per_expert_E):
        failures.append(
            f"counts {par.last_stats.tokens_per_expert_E.tolist()} != {want_stats.tokens_per_expert_E.tolist()}"
        )
    _compare_grads(failures, par, _expected_grads(ref, per_replica), groups)
    return failures


def check_layer_cases(rank: int, world_size: int) -> dict[str, list[str]]:
    return {f"{layout}-{mode}": _layer_parity(rank, layout, mode) for layout, mode in LAYER_CASES}


def check_zero_tokens(rank: int, world_size: int) -> dict[str, list[str]]:
    """Ranks that receive no token copies (and ETP ranks with none to gather) must run and match."""
    return {
        # ep4: every token prefers the experts of EP rank 0 -> ranks 1..3 receive nothing
        "ep4_all_to_rank0": _layer_parity(rank, "ep4", "softmax", forced_dim=lambda d: 0),
        # ep2·etp2: replicas 0, 2 use EP rank 0's experts, 1, 3 EP rank 1's -> one ETP rank of each
        # pair receives nothing from its EP exchange, and the other one everything
        "ep2_etp2_split_by_replica": _layer_parity(rank, "ep2_etp2", "softmax", forced_dim=lambda d: 2 * (d % 2)),
    }


class SwappedSplitsDispatcher(AllToAllDispatcher):
    """Deliberately wrong: sends with the EP destinations' split sizes (and counts) swapped.

    The exchange stays well formed (every rank expects what it is sent) but copies reach the wrong
    experts, which the parity comparison must notice.
    """

    def exchange_counts(self, send_counts_RL: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        return super().exchange_counts(send_counts_RL.flip(0))


def check_swapped_splits_twin(rank: int, world_size: int) -> list[str]:
    return _layer_parity(rank, "ep2", "softmax", dispatcher_cls=SwappedSplitsDispatcher)


# ---------------------------------------------------------------------------------------------
# Full model (DP x EP x ETP; with tp > 1 after the TP engineer's apply_tensor_parallel)


def _model_cfg(mode: str) -> Config:
    return Config(
        model=ModelConfig(hidden_size=H, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, vocab_size=64),
        moe=_moe_cfg(mode),
        train=TrainConfig(seq_len=S, seed=3),
    )


def _tokens(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(200 + d)
    tokens_BS = torch.randint(0, 64, (B, S + 1), generator=gen)
    return tokens_BS[:, :-1], tokens_BS[:, 1:]


def _model_step(model: torch.nn.Module, d: int) -> Any:
    tokens_BS, labels_BS = _tokens(d)
    out = model(tokens_BS, labels_BS)
    out.token_loss_BS.mean().backward()
    return out


def _model_parity(rank: int, layout: str, mode: str) -> list[str]:
    groups = _groups(rank, layout)
    cfg = _model_cfg(mode)
    ref = build_model(cfg)
    par = build_model(cfg)
    apply_tensor_parallel(par, groups)  # no-op when tp == 1
    apply_expert_parallel(par, groups)
    per_replica, outs = [], []
    for d in range(groups.dp_size):
        ref.zero_grad()
        outs.append(_model_step(ref, d))
        per_replica.append({n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None})
    got, want = _model_step(par, groups.dp_rank), outs[groups.dp_rank]
    failures: list[str] = []
    _close(failures, "token loss", got.token_loss_BS, want.token_loss_BS)
    _close(failures, "lbl", got.lbl, want.lbl)
    _close(failures, "zloss", got.zloss, want.zloss)
    if not torch.equal(got.tokens_per_expert_LE, want.tokens_per_expert_LE):
        failures.append("tokens_per_expert_LE differ")
    _compare_grads(failures, par, _expected_grads(ref, per_replica), groups)
    return failures


def check_model_cases(rank: int, world_size: int) -> dict[str, list[str]]:
    return {f"{layout}-{mode}": _model_parity(rank, layout, mode) for layout, mode in MODEL_CASES}


def check_no_stats_reducer_twin(rank: int, world_size: int) -> list[str]:
    """Twin: without the tp-group statistics, SP shards report their own (wrong) micro-batch LBL."""
    return _layer_parity(rank, "tp2_ep1", "softmax", stats_reducer=False)


CHECKS = [
    check_layer_cases,
    check_zero_tokens,
    check_swapped_splits_twin,
    check_no_stats_reducer_twin,
    check_model_cases,
]


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_distributed(run_checks, WORLD, CHECKS, timeout=180.0)


def _failures(results: list[dict[str, Any]], check: str, case: str | None = None) -> list[str]:
    out = []
    for rank, res in enumerate(results):
        value = res[check] if case is None else res[check][case]
        out += [f"rank {rank}: {f}" for f in value]
    return out


@pytest.mark.parametrize("layout,mode", LAYER_CASES, ids=[f"{a}-{b}" for a, b in LAYER_CASES])
def test_moe_layer_parity(results: list[dict[str, Any]], layout: str, mode: str) -> None:
    assert _failures(results, "check_layer_cases", f"{layout}-{mode}") == []


@pytest.mark.parametrize("layout,mode", MODEL_CASES, ids=[f"{a}-{b}" for a, b in MODEL_CASES])
def test_model_parity(results: list[dict[str, Any]], layout: str, mode: str) -> None:
    assert _failures(results, "check_model_cases", f"{layout}-{mode}") == []


@pytest.mark.parametrize("case", ZERO_TOKEN_CASES)
def test_zero_token_ranks(results: list[dict[str, Any]], case: str) -> None:
    assert _failures(results, "check_zero_tokens", case) == []


def test_swapped_splits_are_detected(results: list[dict[str, Any]]) -> None:
    """Twin: the same comparison fails when the all-to-all split sizes are swapped."""
    failures = _failures(results, "check_swapped_splits_twin")
    assert any("output" in f for f in failures), failures


def test_micro_batch_lbl_needs_tp_stats(results: list[dict[str, Any]]) -> None:
    """Twin: the same comparison fails on LBL, z-loss and counts without the stats reducer."""
    failures = _failures(results, "check_no_stats_reducer_twin")
    for what in ("lbl", "zloss", "counts"):
        assert any(f.split(": ", 1)[1].startswith(what) for f in failures), failures


# ---------------------------------------------------------------------------------------------
# Single process


def test_regroup_index_orders_by_local_expert() -> None:
    counts_SL = torch.tensor([[2, 0, 1], [1, 3, 0]])  # 2 sources, 3 local experts
    labels = [(s, e) for s in range(2) for e in range(3) for _ in range(int(counts_SL[s, e]))]
    idx = regroup_index(counts_SL)
    regrouped = [labels[i] for i in idx.tolist()]
    assert regrouped == sorted(labels, key=lambda se: (se[1], se[0]))
    assert torch.equal(idx[inverse_permutation(idx)], torch.arange(idx.numel()))


def test_single_process_is_unchanged() -> None:
    """ProcessGroups.single(): metadata attached, local dispatcher kept, identical outputs."""
    ref = _make_layer("softmax")
    par = copy.deepcopy(ref)
    apply_expert_parallel(par, ProcessGroups.single())
    assert not isinstance(par.dispatcher, AllToAllDispatcher) and par.stats_reducer is None
    meta = get_meta(par.experts.w2_EFH)
    assert meta is not None and meta.canonical_name == "experts.w2_EFH" and meta.shards == [("ep", 0), ("etp", 1)]
    x_BSH, _ = _replica_data(0)
    torch.testing.assert_close(par(x_BSH), ref(x_BSH), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="applied twice"):
        apply_expert_parallel(par, ProcessGroups.single())
