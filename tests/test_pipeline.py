"""Pipeline parallelism: stage splits, schedule orders, and parity with the single-device step.

Every distributed check runs a gradient-accumulated step (M micro-batches, s = 1/M) through the
pipeline and compares, with the single-device step on the same micro-batches: the lm loss of each
micro-batch, the LBL / z-loss of each micro-batch (mean over MoE layers), expert counts, and every
parameter's gradient by canonical name (rtol 1e-5, atol 1e-7), with non-zero LBL and z-loss
coefficients. One spawn of 4 ranks runs all of them (pp4; pp2 x dp2; ep2 x pp2; tp2 x pp2).

Legend: M micro-batches, B micro-batch size, S sequence, L MoE layers, E experts.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from distributed import run_checks, run_distributed  # tests/distributed.py
from torch import nn

from moe_train.config import Config, ConfigError, LBLConfig, ModelConfig, MoEConfig, ParallelConfig
from moe_train.model import build_model
from moe_train.model.transformer import IGNORE_INDEX, MoETransformer, set_aux_loss_scale
from moe_train.parallel import pipeline
from moe_train.parallel.groups import ProcessGroups, build_process_groups
from moe_train.parallel.param_meta import META_ATTR, get_meta, shard_slice
from moe_train.parallel.pipeline import (
    Action,
    PipelineSchedule,
    assign_slots,
    build_pipeline,
    build_stage_modules,
    rank_orders,
    stage_layers,
)

RTOL, ATOL = 1e-5, 1e-7
MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]


def _cfg(
    num_layers: int = 4,
    pp: int = 2,
    vpp: int = 1,
    split: list[int] | None = None,
    dp: int = 1,
    num_micro: int = 4,
    tp: int = 1,
    ep: int = 1,
) -> Config:
    """Tiny MoE model: first layer dense, shared expert on, LBL and z-loss on."""
    cfg = Config()
    cfg.model = ModelConfig(
        hidden_size=32,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        ffn_hidden_size=64,
        vocab_size=128,
    )
    cfg.moe = MoEConfig(
        num_experts=4,
        top_k=2,
        expert_ffn_hidden_size=32,
        num_shared_experts=1,
        first_k_dense=1,
        lbl=LBLConfig(coeff=0.1),
        zloss_coeff=0.01,
    )
    cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.seed = 16, 2, 7
    cfg.train.global_batch_size = 2 * dp * num_micro
    schedule = "interleaved_1f1b" if vpp > 1 else "1f1b"
    cfg.parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp, ep=ep, pp_schedule=schedule, pp_layer_split=split)
    return cfg


def _micro_batches(cfg: Config, num_micro: int, sample_seed: int) -> MicroBatches:
    """Random tokens / labels (a few labels ignored), a pure function of `sample_seed`."""
    g = torch.Generator().manual_seed(sample_seed)
    shape = (num_micro, cfg.train.micro_batch_size, cfg.train.seq_len)
    tokens_MBS = torch.randint(0, cfg.model.vocab_size, shape, generator=g)
    labels_MBS = torch.randint(0, cfg.model.vocab_size, shape, generator=g)
    labels_MBS[:, 0, -3:] = IGNORE_INDEX
    return [(tokens_MBS[m], labels_MBS[m]) for m in range(num_micro)]


def _reference(cfg: Config, micro_batches: MicroBatches) -> dict[str, Any]:
    """The single-device gradient-accumulated step."""
    model = build_model(cfg)
    scale = 1.0 / len(micro_batches)
    set_aux_loss_scale(model, scale)
    losses, lbl, zloss, counts, per_seq = [], [], [], 0, []
    for tokens_BS, labels_BS in micro_batches:
        out = model(tokens_BS, labels_BS)
        assert out.token_loss_BS is not None
        loss = out.token_loss_BS.mean()
        (loss * scale).backward()
        losses.append(loss.detach())
        per_seq.append(out.token_loss_BS.detach().double().mean(dim=1))
        lbl.append(out.lbl)
        zloss.append(out.zloss)
        counts = counts + out.tokens_per_expert_LE
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {
        "loss_M": torch.stack(losses),
        "lbl_M": torch.stack(lbl),
        "zloss_M": torch.stack(zloss),
        "counts": counts,
        "grads": grads,
        "per_seq": torch.cat(per_seq),
    }


def _close(errors: list[str], what: str, actual: torch.Tensor | None, expected: torch.Tensor) -> None:
    if actual is None:
        errors.append(f"{what}: missing")
        return
    try:
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    except AssertionError as e:
        errors.append(f"{what}: {str(e).splitlines()[0]} {str(e).splitlines()[-1]}")


def _expected_shard(full: torch.Tensor, param: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
    """This rank's slice of a canonical tensor, following the parameter's ParamMeta shards."""
    meta = get_meta(param)
    for kind, dim in meta.shards if meta is not None else []:
        full = shard_slice(full, dim, groups.ranks[kind].index(groups.rank), groups.size(kind))
    return full


def _compare(
    ref: dict[str, Any], groups: ProcessGroups, chunks: list[MoETransformer], result: pipeline.PipelineStepResult
) -> dict[str, Any]:
    """Mismatches of losses, MoE stats and gradients against the reference ([] when equal)."""
    errors: list[str] = []
    _close(errors, "lm_loss_M", result.lm_loss_M, ref["loss_M"])
    if groups.is_last_stage:
        _close(errors, "micro_losses", torch.stack(result.micro_losses or []), ref["loss_M"])
    elif result.micro_losses is not None:
        errors.append("micro_losses given on a stage that is not the last")
    _close(errors, "lbl_M", result.lbl_LM.mean(0), ref["lbl_M"])
    _close(errors, "zloss_M", result.zloss_LM.mean(0), ref["zloss_M"])
    if not torch.equal(result.tokens_per_expert_LE, ref["counts"]):
        errors.append(f"counts: {result.tokens_per_expert_LE.tolist()} != {ref['counts'].tolist()}")
    names = []
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            meta = get_meta(param)
            canonical = meta.canonical_name if meta is not None else name
            names.append(canonical)
            _close(errors, f"grad {canonical}", param.grad, _expected_shard(ref["grads"][canonical], param, groups))
    return {"errors": errors, "names": names, "pp_rank": groups.pp_rank, "dp_rank": groups.dp_rank}


def _run(
    cfg: Config, rank: int, world: int, num_micro: int, same_replicas: bool = False, apply: Any = None
) -> dict[str, Any]:
    """Pipeline step vs the single-device step on this replica's micro-batches.

    `apply(model, groups)` applies TP / EP first; their gradients are then reduced with the ParamMeta
    rule (replicas get identical micro-batches then, so the reduced gradient equals the reference)."""
    groups = build_process_groups(cfg, world, rank)
    micro_batches = _micro_batches(cfg, num_micro, 100 + (0 if same_replicas else groups.dp_rank))
    ref = _reference(cfg, micro_batches)
    model = build_model(cfg)
    if apply is not None:
        apply(model, groups)
    chunks, schedule = build_pipeline(model, groups, cfg)
    result = schedule.forward_backward(micro_batches, 1.0 / num_micro)
    if apply is not None:
        from moe_train.parallel.data_parallel import reduce_gradients_naive

        reduce_gradients_naive(list(chunks), groups)
    return _compare(ref, groups, chunks, result)


def _run_with_reducer(cfg: Config, rank: int, world: int, num_micro: int) -> dict[str, Any]:
    """Pipeline + data-parallel GradReducer (sync driven by the schedule) on different replicas'
    micro-batches, given as data Batches with domains: the reduced gradients equal the single-device
    step over all replicas' micro-batches; the domain loss sums those of this replica."""
    from moe_train.data import Batch
    from moe_train.parallel.data_parallel import GradReducer

    groups = build_process_groups(cfg, world, rank)
    per_replica = [_micro_batches(cfg, num_micro, 100 + d) for d in range(groups.dp_size)]
    ref = _reference(cfg, [mb for mbs in per_replica for mb in mbs])
    chunks, schedule = build_pipeline(build_model(cfg), groups, cfg)
    schedule.reducer = GradReducer(list(chunks), groups, bucket_mb=0.01)
    domains = [torch.tensor([m % 3, 2]) for m in range(num_micro)]
    batches = [Batch(t, lab, d) for (t, lab), d in zip(per_replica[groups.dp_rank], domains, strict=True)]
    result = schedule.forward_backward(batches, 1.0 / num_micro, num_domains=3)
    schedule.reducer.finish()
    errors: list[str] = []
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            _close(errors, f"grad {name}", param.grad, ref["grads"][name])
    own = ref["per_seq"].view(groups.dp_size, -1)[groups.dp_rank]
    expected_sum = torch.zeros(3, dtype=torch.float64).index_add_(0, torch.cat(domains), own)
    _close(errors, "domain_sum", result.domain_sum, expected_sum)
    _close(errors, "domain_count", result.domain_count, torch.tensor([1.0, 1.0, 4.0], dtype=torch.float64))
    return {"errors": errors, "names": [n for c in chunks for n, _ in c.named_parameters()], "dp_rank": groups.dp_rank}


# ---------------------------------------------------------------------------------------------
# Checks run on 4 ranks (module-level so spawn can import them)


def check_pp4_1f1b(rank: int, world: int) -> list[dict[str, Any]]:
    """pp 4, one layer per stage; 4 micro-batches and 2 (fewer than pp: still exact)."""
    return [_run(_cfg(num_layers=4, pp=4, num_micro=m), rank, world, m) for m in (4, 2)]


def check_pp2_dp2_1f1b(rank: int, world: int) -> list[dict[str, Any]]:
    return [_run(_cfg(num_layers=4, pp=2, dp=2, num_micro=3), rank, world, 3)]


def check_pp2_dp2_interleaved(rank: int, world: int) -> list[dict[str, Any]]:
    """vpp 2 over 8 layers; M = 4 (steady state) and M = pp (all warm-up)."""
    return [_run(_cfg(num_layers=8, pp=2, vpp=2, dp=2, num_micro=m), rank, world, m) for m in (4, 2)]


def check_pp2_dp2_uneven(rank: int, world: int) -> list[dict[str, Any]]:
    return [_run(_cfg(num_layers=4, pp=2, split=[1, 3], dp=2, num_micro=2), rank, world, 2)]


def check_twin_aux_scale_one(rank: int, world: int) -> list[dict[str, Any]]:
    """Twin: aux losses left at gradient 1.0 instead of s = 1/M must break gradient parity."""
    keep = pipeline.set_aux_loss_scale
    pipeline.set_aux_loss_scale = lambda model, scale: None  # type: ignore[assignment]
    try:
        return [_run(_cfg(num_layers=4, pp=2, dp=2, num_micro=3), rank, world, 3)]
    finally:
        pipeline.set_aux_loss_scale = keep


def check_pp2_dp2_grad_reducer(rank: int, world: int) -> list[dict[str, Any]]:
    return [_run_with_reducer(_cfg(num_layers=4, pp=2, dp=2, num_micro=3), rank, world, 3)]


def _apply_ep(model: nn.Module, groups: ProcessGroups) -> None:
    from moe_train.parallel.expert_parallel import apply_expert_parallel

    apply_expert_parallel(model, groups)


def _apply_tp_ep(model: nn.Module, groups: ProcessGroups) -> None:
    from moe_train.parallel.tensor_parallel import apply_tensor_parallel

    apply_tensor_parallel(model, groups)
    # tensor_parallel.py gives routed experts a default ParamMeta that expert_parallel.py then refuses
    # ("EP applied twice?"); drop it until the two agree (reported to the lead).
    for name, param in model.named_parameters():
        if ".moe.experts." in name:
            delattr(param, META_ATTR)
    _apply_ep(model, groups)


def check_ep2_pp2(rank: int, world: int) -> list[dict[str, Any]]:
    return [_run(_cfg(num_layers=4, pp=2, dp=2, ep=2, num_micro=2), rank, world, 2, True, _apply_ep)]


def check_tp2_pp2(rank: int, world: int) -> list[dict[str, Any]]:
    return [_run(_cfg(num_layers=4, pp=2, tp=2, num_micro=2), rank, world, 2, True, _apply_tp_ep)]


CHECKS = [
    check_pp4_1f1b,
    check_pp2_dp2_1f1b,
    check_pp2_dp2_interleaved,
    check_pp2_dp2_uneven,
    check_twin_aux_scale_one,
    check_pp2_dp2_grad_reducer,
    check_ep2_pp2,
    check_tp2_pp2,
]


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_distributed(run_checks, 4, CHECKS, timeout=300.0)


def _assert_parity(results: list[dict[str, Any]], check: str, num_params: int) -> None:
    for run in range(len(results[0][check])):
        per_rank = [r[check][run] for r in results]
        for rank, res in enumerate(per_rank):
            assert res["errors"] == [], f"{check} run {run} rank {rank}: {res['errors'][:5]}"
        for dp_rank in {res["dp_rank"] for res in per_rank}:  # the stages of a replica hold every parameter
            names = [n for res in per_rank if res["dp_rank"] == dp_rank for n in res["names"]]
            assert len(set(names)) == num_params, f"{check}: replica {dp_rank} holds {len(set(names))} parameters"


def _num_params(num_layers: int) -> int:
    return len(list(build_model(_cfg(num_layers=num_layers)).parameters()))


@pytest.mark.parametrize(
    "check",
    [
        "check_pp4_1f1b",
        "check_pp2_dp2_1f1b",
        "check_pp2_dp2_uneven",
        "check_pp2_dp2_grad_reducer",
        "check_ep2_pp2",
        "check_tp2_pp2",
    ],
)
def test_pipeline_matches_single_device(results: list[dict[str, Any]], check: str) -> None:
    _assert_parity(results, check, _num_params(4))


def test_interleaved_matches_single_device(results: list[dict[str, Any]]) -> None:
    _assert_parity(results, "check_pp2_dp2_interleaved", _num_params(8))


def test_twin_aux_loss_scale_one_breaks_gradients(results: list[dict[str, Any]]) -> None:
    for rank, res in enumerate(r["check_twin_aux_scale_one"][0] for r in results):
        assert res["errors"], f"rank {rank}: gradients matched although the aux losses had gradient 1.0"
        assert all(e.startswith("grad ") for e in res["errors"]), res["errors"]
        assert any(".moe.router." in e for e in res["errors"]), res["errors"]


# ---------------------------------------------------------------------------------------------
# Single-process tests


def test_stage_layers_even_interleaved_and_uneven() -> None:
    assert stage_layers(4, 2) == [[0, 1], [2, 3]]
    assert stage_layers(8, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]  # rank 0 holds chunks 0 and 2
    assert stage_layers(4, 2, 1, [1, 3]) == [[0], [1, 2, 3]]
    with pytest.raises(ConfigError, match="not divisible"):
        stage_layers(5, 2)
    with pytest.raises(ConfigError, match="sums to 3"):
        stage_layers(4, 2, 1, [1, 2])


def _schedule_cases() -> list[tuple[str, int, int, int]]:
    cases = [("1f1b", pp, 1, m) for pp in (1, 2, 3, 4) for m in (1, 2, 3, 5, 8)]
    return cases + [("interleaved_1f1b", pp, vpp, k * pp) for pp in (2, 3, 4) for vpp in (2, 3) for k in (1, 2, 3)]


@pytest.mark.parametrize(("schedule", "pp", "vpp", "num_micro"), _schedule_cases())
def test_schedules_complete_and_deadlock_free(schedule: str, pp: int, vpp: int, num_micro: int) -> None:
    orders = rank_orders(schedule, pp, vpp, num_micro)
    everything = sorted(Action(b, v, m) for b in (False, True) for v in range(vpp) for m in range(num_micro))
    for order in orders:
        assert sorted(order) == everything
    timeline = assign_slots(orders, vpp)
    slot_of = {(a.backward, a.chunk * pp + p, a.micro): t for p in range(pp) for t, a in timeline.actions[p].items()}
    for (backward, c, m), t in slot_of.items():
        before = [(False, c - 1, m)] if not backward and c > 0 else []
        before += [(False, c, m)] + ([(True, c + 1, m)] if c < pp * vpp - 1 else []) if backward else []
        assert all(slot_of[d] < t for d in before), (backward, c, m)
    for messages in timeline.messages:  # at most one tensor per (sender, receiver) and slot
        pairs = [(msg.src, msg.dst) for msg in messages]
        assert len(pairs) == len(set(pairs))
    if schedule == "1f1b":  # 1F1B's memory bound: rank p holds at most pp - p micro-batches in flight
        for p, order in enumerate(orders):
            in_flight = [sum(1 if not a.backward else -1 for a in order[: i + 1]) for i in range(len(order))]
            assert max(in_flight) <= pp - p


def test_interleaved_needs_micro_batches_divisible_by_pp() -> None:
    with pytest.raises(ValueError, match=r"micro-batches \(3\) divisible by parallel.pp \(2\)"):
        rank_orders("interleaved_1f1b", 2, 2, 3)


def test_stage_modules_share_parameters_and_keep_names() -> None:
    cfg = _cfg(num_layers=8, pp=2, vpp=2)
    model = build_model(cfg)
    params = dict(model.named_parameters())
    chunks = build_stage_modules(model, ProcessGroups(pp_rank=1, pp_size=2, vpp_size=2), cfg)
    assert [list(c.layers) for c in chunks] == [["2", "3"], ["6", "7"]]
    assert chunks[0].tok_embeddings is None and chunks[0].output is None
    assert chunks[1].tok_embeddings is None and chunks[1].output is not None and chunks[1].norm is not None
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            assert p is params[name]
    assert len(model.layers) == 8 and model.tok_embeddings is not None  # the full model is untouched
    first = build_stage_modules(model, ProcessGroups(pp_rank=0, pp_size=2, vpp_size=2), cfg)
    assert first[0].tok_embeddings is not None and first[1].output is None


def test_tied_embeddings_with_pp_rejected() -> None:
    cfg = _cfg()
    cfg.model.tie_embeddings = True
    with pytest.raises(NotImplementedError, match="tie_embeddings"):
        build_stage_modules(build_model(cfg), ProcessGroups(pp_size=2), cfg)


def test_single_stage_runner_matches_single_device() -> None:
    """pp 1: the runner without communication gives the single-device losses, stats and gradients."""
    cfg = _cfg(num_layers=3, pp=1)
    micro_batches = _micro_batches(cfg, 3, 1)
    ref = _reference(cfg, micro_batches)
    groups = ProcessGroups.single()
    chunks = build_stage_modules(build_model(cfg), groups, cfg)
    result = PipelineSchedule(chunks, groups, cfg).forward_backward(micro_batches, 1.0 / 3)
    res = _compare(ref, groups, chunks, result)
    assert res["errors"] == []
    assert result.lm_loss == pytest.approx(float(ref["loss_M"].mean()), rel=1e-6)
    assert result.lbl == pytest.approx(float(ref["lbl_M"].mean()), rel=1e-6)
