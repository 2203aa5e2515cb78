"""Context parallelism: exact attention over load-balanced chunks, parity with one process, resharding.

Two process-group spawns: 2 ranks (attention checks; cp2, cp2·ep2 folded, cp2 with global-batch and
sequence-scope LBL; the broken-K/V twin; a cp2 resume of a single-process checkpoint) and 8 ranks
(cp2·tp2, cp2·pp2, cp4·tp2·ep4 folded).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from parity import RECORD_KEYS, layout_config, parity_errors, record_errors, reference_run, run_layouts

from moe_train.config import load_config
from moe_train.model.attention import Attention, causal_attention
from moe_train.parallel.context_parallel import (
    context_parallel_attention,
    document_causal_attention,
    local_positions,
    shard_sequence,
)
from moe_train.parallel.groups import build_process_groups
from moe_train.parallel.layout import rank_layout
from moe_train.parallel.parallelize import parallelize
from moe_train.train import checkpoint as ckpt
from moe_train.train.trainer import Trainer

LAYOUTS: dict[int, dict[str, list[str]]] = {
    2: {
        "cp2": ["parallel.cp=2", "checkpoint.every=3"],
        "cp2_ep2_folded": ["parallel.cp=2", "parallel.ep=2"],
        "cp2_local_kv_only": ["parallel.cp=2"],
        "cp2_global_lbl_exact": ["parallel.cp=2", "moe.lbl.scope=global"],
        "cp2_sequence_lbl": ["parallel.cp=2", "moe.lbl.scope=sequence"],
        "cp2_selective_chunked_loss": ["parallel.cp=2", "train.recompute=selective", "train.loss_chunk_tokens=96"],
    },
    8: {
        "cp2_tp2_dp2": ["parallel.cp=2", "parallel.tp=2"],
        "cp2_pp2_dp2": ["parallel.cp=2", "parallel.pp=2"],
        "cp2_tp2_full_chunked_loss": [
            "parallel.cp=2",
            "parallel.tp=2",
            "train.recompute=full",
            "train.loss_chunk_tokens=64",
        ],
        "cp4_tp2_ep4_folded": ["parallel.cp=4", "parallel.tp=2", "parallel.ep=4"],
    },
}
BROKEN = "cp2_local_kv_only"


def parallelize_local_kv_only(model, groups, cfg):  # type: ignore[no-untyped-def]
    """A deliberately wrong cp: attention sees only this rank's own K/V (no exchange)."""
    pm = parallelize(model, groups, cfg)
    for chunk in pm.chunks:
        for module in chunk.modules():
            if isinstance(module, Attention):
                module.core_attention = causal_attention
    return pm


# ---------------------------------------------------------------------------------------------
# Attention under cp against the single-device attention (run inside the 2-rank spawn)


def _attention_case(rank: int, seed: int, doc_S: torch.Tensor | None, heads: tuple[int, int]) -> dict[str, float]:
    """Max abs differences of output and dq/dk/dv between cp attention and the single-device one."""
    cp, S, D = dist.get_world_size(), doc_S.numel() if doc_S is not None else 16, 8
    N, G = heads
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, S, n, D, generator=gen, dtype=torch.float64) for n in (N, G, G))
    w = torch.randn(2, S, N, D, generator=gen, dtype=torch.float64)
    doc_BS = None if doc_S is None else doc_S.expand(2, S)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = document_causal_attention(*full, doc_BS)
    (ref * w).sum().backward()
    local = [shard_sequence(t, 1, cp, rank).requires_grad_() for t in (q, k, v)]
    doc_local = None if doc_BS is None else shard_sequence(doc_BS, 1, cp, rank)
    out = context_parallel_attention(*local, dist.group.WORLD, doc_local)
    (out * shard_sequence(w, 1, cp, rank)).sum().backward()
    diffs = {"out": (out - shard_sequence(ref, 1, cp, rank)).abs().max().item()}
    for name, got, want in zip(("dq", "dk", "dv"), local, full, strict=True):
        assert got.grad is not None and want.grad is not None
        diffs[name] = (got.grad - shard_sequence(want.grad, 1, cp, rank)).abs().max().item()
    local_only = causal_attention(*[t.detach() for t in local])  # twin: no K/V exchange
    diffs["local_only"] = (local_only - shard_sequence(ref.detach(), 1, cp, rank)).abs().max().item()
    return diffs


def attention_checks(rank: int) -> dict[str, dict[str, float]]:
    # cp 2: chunks of 4 tokens [0-3 | 4-7 | 8-11 | 12-15]; documents straddle every chunk boundary
    docs = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3])
    return {
        "causal_gqa": _attention_case(rank, 0, None, (4, 2)),
        "causal_mha": _attention_case(rank, 1, None, (2, 2)),
        "documents_gqa": _attention_case(rank, 2, docs, (4, 1)),
    }


# ---------------------------------------------------------------------------------------------
# Workers


def _train(rank: int, world_size: int, overrides: list[str], run_dir: Path) -> list[dict]:
    cfg = layout_config(overrides, run_dir)
    trainer = Trainer(cfg, build_process_groups(cfg, world_size, rank))
    return [{k: r[k] for k in RECORD_KEYS} | {"step": r["step"]} for r in trainer.fit()]


def world2_worker(rank: int, world_size: int, root: Path, resume_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"attention": attention_checks(rank)}
    out["layouts"] = run_layouts(rank, world_size, LAYOUTS[2], root, {BROKEN: parallelize_local_kv_only})
    out["resumed_cp2"] = _train(rank, world_size, ["parallel.cp=2", "checkpoint.resume=latest"], resume_dir)
    return out


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The single-process run (checkpoints at steps 3 and 5) and its run directory."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    result = reference_run(["checkpoint.every=3"], run_dir)
    result["records"] = [r | {"step": i} for i, r in enumerate(result["records"], start=1)]
    return result | {"run_dir": run_dir}


def _resumable_copy(run_dir: Path, dest: Path) -> Path:
    """A copy of a run directory with only its step-3 checkpoint."""
    shutil.copytree(run_dir, dest)
    shutil.rmtree(dest / "checkpoints" / "step_00000005")
    return dest


@pytest.fixture(scope="module")
def world2(single: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("world2")
    resume_dir = _resumable_copy(single["run_dir"], root / "resume_from_single")
    results = run_distributed(world2_worker, 2, root, resume_dir, timeout=900)
    return dict(results[0]) | {"root": root, "attention_by_rank": [r["attention"] for r in results]}


@pytest.fixture(scope="module")
def world8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("world8")
    results = run_distributed(run_layouts, 8, LAYOUTS[8], root, {}, timeout=900)
    return dict(results[0])


# ---------------------------------------------------------------------------------------------
# Tests


def test_attention_matches_single_device(world2: dict[str, Any]) -> None:
    for rank, cases in enumerate(world2["attention_by_rank"]):
        for name, diffs in cases.items():
            for key in ("out", "dq", "dk", "dv"):
                assert diffs[key] < 1e-12, (rank, name, key, diffs[key])
            assert diffs["local_only"] > 1e-3, f"rank {rank} {name}: attention without the K/V exchange is not caught"


def _reference(overrides: list[str], single: dict, root: Path) -> dict:
    """The single-process run of a layout's non-parallel overrides (the `single` run when they only
    set checkpointing, which changes no number)."""
    kept = [o for o in overrides if not o.startswith(("parallel.", "checkpoint."))]
    return single if not kept else reference_run(kept, root / "_".join(kept).replace("=", "-"))


def test_cp_layouts_match_single_process(
    world2: dict[str, Any], world8: dict[str, dict], single: dict, tmp_path: Path
) -> None:
    failures = {}
    results = {**{k: v for k, v in world2["layouts"].items() if k != BROKEN}, **world8}
    overrides = {**LAYOUTS[2], **LAYOUTS[8]}
    for name, result in results.items():
        errors = parity_errors(result, _reference(overrides[name], single, tmp_path))
        if errors:
            failures[name] = errors[:5]
    assert not failures, failures
    assert len(results) == len(overrides) - 1  # every layout but the broken twin


def test_broken_kv_exchange_is_caught(world2: dict[str, Any], single: dict) -> None:
    errors = parity_errors(world2["layouts"][BROKEN], single)
    assert any("lm_loss" in e for e in errors), "attention on local K/V only went unnoticed"


def test_single_process_checkpoint_resumes_under_cp2(world2: dict[str, Any], single: dict) -> None:
    resumed = world2["resumed_cp2"]
    assert [r["step"] for r in resumed] == [4, 5]
    assert not record_errors(resumed, single["records"][3:])


def test_cp2_checkpoint_resumes_in_single_process(world2: dict[str, Any], single: dict, tmp_path: Path) -> None:
    saved = world2["root"] / "cp2"
    assert [p.name for p in ckpt.list_checkpoints(saved)] == ["step_00000003", "step_00000005"]
    run_dir = _resumable_copy(saved, tmp_path / "run")
    trainer = Trainer(layout_config(["checkpoint.resume=latest"], run_dir))
    assert trainer.state == ckpt.TrainState(step=3, consumed_samples=24)
    records = [{k: r[k] for k in RECORD_KEYS} | {"step": r["step"]} for r in trainer.fit()]
    assert [r["step"] for r in records] == [4, 5]
    assert not record_errors(records, single["records"][3:])


# ---------------------------------------------------------------------------------------------
# Layout, positions and bad input (no processes)


def test_layout_folds_cp_into_the_attention_mesh() -> None:
    cfg = load_config(None, ["parallel.cp=2", "parallel.tp=2", "parallel.ep=4"])
    layout = rank_layout(8, cfg.parallel)
    assert (layout.dp, layout.cp, layout.tp, layout.edp, layout.ep) == (2, 2, 2, 2, 4)
    assert layout.groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups["tp_cp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.groups["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.groups["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout.groups["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.groups["stage"] == layout.groups["lbl"] == [list(range(8))]
    assert [layout.coords(r).cp_rank for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]


def test_load_balanced_positions() -> None:
    assert local_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert local_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    seen = torch.cat([local_positions(32, 4, r) for r in range(4)])
    assert sorted(seen.tolist()) == list(range(32))
    x = torch.arange(16).view(1, 16)
    assert shard_sequence(x, 1, 2, 1).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_train.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--dry-run", "--world-size", "4", "parallel.cp=2", "train.seq_len=18"],
            "train.seq_len (18) is not divisible by 2 * parallel.cp (4)",
        ),
        (
            [
                "--dry-run",
                "--world-size",
                "8",
                "parallel.cp=2",
                "parallel.tp=4",
                "model.num_kv_heads=4",
                "train.seq_len=20",
            ],
            "train.seq_len / parallel.cp (10) is not divisible by parallel.tp (4)",
        ),
        (["parallel.cp=2", "data.mock=true"], "world size (1) is not divisible by parallel.tp (1) * parallel.cp (2)"),
    ],
)
def test_bad_cp_layout_is_one_line_and_writes_nothing(args: list[str], message: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _cli("train", *args, f"run.dir={run_dir}")
    assert proc.returncode != 0
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not run_dir.exists()


def test_dry_run_prints_cp_groups() -> None:
    proc = _cli(
        "train", "--dry-run", "--world-size", "8", "parallel.cp=2", "parallel.tp=2", "parallel.ep=4", "train.seq_len=64"
    )
    assert proc.returncode == 0, proc.stderr
    assert "attention [pp 1, dp 2, cp 2, tp 2]" in proc.stdout
    assert "  cp " in proc.stdout and "dp_cp" in proc.stdout and "tp_cp" in proc.stdout


@pytest.mark.parametrize(("c", "L", "heads"), [(4, 4, (4, 2)), (4, 16, (4, 2)), (3, 12, (2, 2)), (5, 20, (4, 1))])
def test_prefix_causal_attention_matches_masked_sdpa(c: int, L: int, heads: tuple[int, int]) -> None:
    """The mask-free CPU blocks (non-causal prefix + causal diagonal, merged by log-sum-exp) equal SDPA
    with the explicit lower-right causal mask, forward and backward."""
    from moe_train.parallel.context_parallel import _masked_attention, prefix_causal_attention

    gen = torch.Generator().manual_seed(c * L)
    N, G = heads
    q, k, v = (torch.randn(2, n, h, 8, generator=gen, dtype=torch.float64) for n, h in ((c, N), (L, G), (L, G)))
    w = torch.randn(2, c, N, 8, generator=gen, dtype=torch.float64)
    mask_1cL = torch.ones(c, L, dtype=torch.bool).tril(L - c).unsqueeze(0)
    results = []
    for attend in (prefix_causal_attention, lambda q, k, v: _masked_attention(q, k, v, mask_1cL)):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*inputs)
        (out * w).sum().backward()
        results.append([out.detach(), *(t.grad for t in inputs)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    plain = causal_attention(q, k[:, -c:], v[:, -c:])  # twin: ignoring the prefix keys changes the result
    assert (plain - results[1][0]).abs().max() > 1e-3 or c == L


def test_planner_models_the_kv_all_gather() -> None:
    """`moe-train plan` models what the trainer builds: under cp_comm 'allgather' the saved activations
    of an attention block grow by the other ranks' K/V of the whole sequence; a ring does not."""
    import dataclasses

    from moe_train.plan.memory import attention_activation_bytes
    from moe_train.plan.space import PlanLayout, PlanOptions
    from moe_train.plan.workload import build_workload

    cfg = load_config(None, ["model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16"])
    ring = PlanOptions(seq_len=128, global_batch_size=16, activation_bytes=2.0, cp_comm="ring")
    gather = dataclasses.replace(ring, cp_comm="allgather")
    layout = PlanLayout(cp=4, micro_batch_size=2)
    w = build_workload(cfg, layout, gather, 4)
    extra = attention_activation_bytes(w, "none") - attention_activation_bytes(
        build_workload(cfg, layout, ring, 4), "none"
    )
    assert extra == pytest.approx(3 * (2 * 128 / 4) * 2 * (2 * 16) * 2.0)  # (cp-1) x local tokens x K,V x G*D x bytes
