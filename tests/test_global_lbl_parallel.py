"""The exact global-batch LBL is split-invariant across parallel layouts; sequence scope, streaming mode,
expert bias and the per-domain routing counts under parallelism; a reshard resume keeps the bias.

The same global batch (8 sequences) as dp1 x 8 micro-batches, dp2 x 4 and dp4 x 2, with ep2, tp2 and
pp2 on top: identical LBL per step and parameters after 5 steps (fp32, rtol 1e-5) to the one-process
run with the whole batch as one micro-batch; also under engine.name=deepspeed (ZeRO-1, dp4 x ep2, with
the expert bias) when DeepSpeed is installed. The twin (micro-batch scope is not invariant to the
micro-batch size) is in test_load_balance.py. One process-group spawn per world size.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from distributed import run_distributed
from parity import canonical_parameters, layout_config

from moe_train.parallel.groups import build_process_groups
from moe_train.train import checkpoint as ckpt
from moe_train.train.trainer import Trainer

GLOBAL = ["moe.lbl.scope=global", "train.micro_batch_size=1", "train.eval_every=0"]
BIAS = ["moe.score_func=sigmoid", "moe.bias_update_rate=0.01", "checkpoint.every=3"]
LAYOUTS: dict[int, dict[str, list[str]]] = {
    2: {
        "dp2": GLOBAL,
        "dp2_ep2": [*GLOBAL, "parallel.ep=2"],
        "streaming_dp2": [*GLOBAL, "moe.lbl.global_mode=streaming"],
    },
    4: {
        "dp4": GLOBAL,
        "dp4_ep2": [*GLOBAL, "parallel.ep=2"],
        "dp2_tp2": [*GLOBAL, "parallel.tp=2"],
        "dp2_pp2": [*GLOBAL, "parallel.pp=2"],
        "dp2_pp2_vpp2": [*GLOBAL, "parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved_1f1b"],
        "tp2_pp2_ep2": [*GLOBAL, "parallel.tp=2", "parallel.pp=2", "parallel.ep=2"],
        "sequence_tp2_ep2": [*GLOBAL, "moe.lbl.scope=sequence", "parallel.tp=2", "parallel.ep=2"],
        "bias_tp2_ep2": [*GLOBAL, *BIAS, "parallel.tp=2", "parallel.ep=2"],
        "streaming_pp2": [*GLOBAL, "moe.lbl.global_mode=streaming", "parallel.pp=2"],
        "streaming_tp2": [*GLOBAL, "moe.lbl.global_mode=streaming", "parallel.tp=2"],
    },
}
if importlib.util.find_spec("deepspeed") is not None:  # a dev dependency; the DeepSpeed engine's step
    DEEPSPEED = ["engine.name=deepspeed", 'engine.deepspeed_config={"zero_optimization": {"stage": 1}}']
    LAYOUTS[4]["deepspeed_bias_dp4_ep2"] = [*GLOBAL, *BIAS, *DEEPSPEED, "parallel.ep=2"]
REFERENCE = {  # layout -> the one-process run it must equal (None: the dp2 run of the same mode)
    "sequence_tp2_ep2": [*GLOBAL, "moe.lbl.scope=sequence", "train.micro_batch_size=8"],
    "bias_tp2_ep2": [*GLOBAL, *BIAS, "train.micro_batch_size=8"],
}
REFERENCE_OF = {"deepspeed_bias_dp4_ep2": "bias_tp2_ep2"}  # layouts that share a one-process run
STREAMING = {
    "streaming_pp2": "streaming_dp2",
    "streaming_tp2": "streaming_dp2",
}  # same split (dp2 x 4): streaming must agree
"""Streaming is not split-invariant (by design); with the same split, pp must not change it."""


class _Recording(Trainer):
    """Keeps each step's reduced routing counts and the counting-pass check."""

    routing: list[torch.Tensor]
    mismatches: list[int]

    def train_step(self):  # type: ignore[no-untyped-def]
        result = super().train_step()
        self.routing.append(result.routing_counts_LDE)
        self.mismatches.append(self.balancer.count_mismatch)
        return result


def _run(rank: int, world_size: int, overrides: list[str], run_dir: Path) -> dict:
    cfg = layout_config(overrides, run_dir)
    groups = build_process_groups(cfg, world_size, rank) if world_size > 1 else None
    trainer = _Recording(cfg, groups)
    trainer.routing, trainer.mismatches = [], []
    records = trainer.fit()
    biases = {
        name: buf.clone()
        for chunk in trainer.pmodel.chunks
        for name, buf in chunk.named_buffers()
        if name.endswith("expert_bias_E")
    }
    return {
        "lbl": [r["lbl"] for r in records],
        "loss": [r["loss"] for r in records],
        "params": canonical_parameters(trainer.pmodel, trainer.groups),
        "routing": trainer.routing,
        "mismatches": trainer.mismatches,
        "biases": biases,
    }


def _layouts(rank: int, world_size: int, layouts: dict[str, list[str]], root: Path) -> dict:
    return {name: _run(rank, world_size, overrides, root / name) for name, overrides in layouts.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, list[dict]], Path]:
    """{layout: per-rank results} of both world sizes (one spawn each), and their run root."""
    root = tmp_path_factory.mktemp("layouts")
    merged: dict[str, list[dict]] = {}
    for world_size, layouts in LAYOUTS.items():
        ranks = run_distributed(_layouts, world_size, layouts, root, timeout=900)
        for name in layouts:
            merged[name] = [r[name] for r in ranks]
    return merged, root


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("references")
    cases = {"global": [*GLOBAL, "train.micro_batch_size=8"], **REFERENCE}
    return {name: _run(0, 1, overrides, root / name) for name, overrides in cases.items()}


def _differences(got: dict, want: dict) -> list[str]:
    """LBL per step (rtol 1e-5), final parameters (rtol 1e-5, atol 1e-6) and routing counts (exact)."""
    out = [
        f"step {i} lbl {a} != {b}"
        for i, (a, b) in enumerate(zip(got["lbl"], want["lbl"], strict=True), start=1)
        if abs(a - b) > 1e-5 * abs(b)
    ]
    for name, w in want["params"].items():
        g = got["params"][name]
        if torch.isnan(g).any() or not torch.allclose(g, w, rtol=1e-5, atol=1e-6):
            out.append(f"{name}: max abs diff {(g - w).abs().max().item():.2e}")
    if not all(torch.equal(a, b) for a, b in zip(got["routing"], want["routing"], strict=True)):
        out.append("routing counts per (layer, domain, expert) differ")
    return out


def test_exact_global_lbl_layouts_equal_the_one_process_whole_batch_run(runs, references) -> None:  # type: ignore[no-untyped-def]
    failures = {}
    for name, ranks in runs[0].items():
        if name.startswith("streaming"):
            continue
        want = references.get(REFERENCE_OF.get(name, name), references["global"])
        assert len(want["lbl"]) == 5 and want["mismatches"] == [0] * 5
        errors = _differences(ranks[0], want)
        if any(r["mismatches"] != [0] * 5 for r in ranks):
            errors.append(f"counting pass mismatches {[r['mismatches'] for r in ranks]}")
        if errors:
            failures[name] = errors[:4]
    assert not failures, failures


def test_streaming_agrees_between_layouts_with_the_same_split(runs) -> None:  # type: ignore[no-untyped-def]
    for name, peer in STREAMING.items():
        assert not _differences(runs[0][name][0], runs[0][peer][0]), name


def test_routing_counts_cover_the_global_batch_on_every_rank(runs) -> None:  # type: ignore[no-untyped-def]
    for name, ranks in runs[0].items():
        for result in ranks:
            for counts_LDE in result["routing"]:
                assert counts_LDE.shape == (3, 1, 8), name  # 3 MoE layers, the mock domain, 8 experts
                assert counts_LDE.sum(-1).flatten().tolist() == [8 * 16 * 2] * 3, name  # 8 seqs x 16 tokens x k
            assert all(torch.equal(a, b) for a, b in zip(result["routing"], ranks[0]["routing"], strict=True))


def test_expert_bias_is_equal_on_every_rank_and_to_one_process(runs, references) -> None:  # type: ignore[no-untyped-def]
    want = references["bias_tp2_ep2"]["biases"]
    assert len(want) == 3 and all(b.abs().sum() > 0 for b in want.values())
    for rank, result in enumerate(runs[0]["bias_tp2_ep2"]):
        assert set(result["biases"]) == set(want), rank
        for name, bias in result["biases"].items():
            assert torch.equal(bias, want[name]), (rank, name)
    for rank, result in enumerate(runs[0].get("deepspeed_bias_dp4_ep2", [])):  # names carry the engine's prefix
        got = {name.split("model.", 1)[-1]: bias for name, bias in result["biases"].items()}
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want), rank


def _resume_single(runs, tmp_path: Path, zero_buffers: bool) -> dict:  # type: ignore[no-untyped-def]
    run_dir = tmp_path / "run"
    shutil.copytree(runs[1] / "bias_tp2_ep2", run_dir)
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_00000003", "step_00000005"]
    shutil.rmtree(run_dir / "checkpoints" / "step_00000005")
    trainer = Trainer(layout_config([*REFERENCE["bias_tp2_ep2"], "checkpoint.resume=latest"], run_dir))
    if zero_buffers:
        for _, buf in trainer.model.named_buffers():
            buf.zero_()
    records = trainer.fit()
    biases = {n: b for n, b in trainer.model.named_buffers() if n.endswith("expert_bias_E")}
    return {"lbl": [r["lbl"] for r in records], "loss": [r["loss"] for r in records], "biases": biases}


def test_reshard_resume_keeps_the_expert_bias(runs, references, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Saved under tp2·ep2 (world 4) at step 3, resumed in one process: steps 4-5 and the final bias
    equal the uninterrupted one-process run."""
    want = references["bias_tp2_ep2"]
    got = _resume_single(runs, tmp_path, zero_buffers=False)
    for key in ("lbl", "loss"):
        assert got[key] == pytest.approx(want[key][3:], rel=1e-5), key
    assert all(torch.equal(b, want["biases"][n]) for n, b in got["biases"].items())


def test_twin_reshard_resume_without_the_bias_differs(runs, references, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    got = _resume_single(runs, tmp_path, zero_buffers=True)
    assert got["loss"] != pytest.approx(references["bias_tp2_ep2"]["loss"][3:], rel=1e-5)
