"""Meta-device construction with per-shard initialisation (moe_train.model.init, moe_train.parallel.materialize).

- Every layout's gathered initial parameters equal one process's `build_model(cfg)` bit for bit; the twin
  materialises each shard from offset 0 of its canonical tensor (ignoring its own box) and is caught.
- A rank's build allocates only its shards (plus RoPE tables and the bounded working block): counted
  with a dispatch mode that adds up every fresh tensor allocation (an upper bound on the peak).
- Loading a checkpoint copies only the rank's own boxes out of the stored chunks.
One process-group spawn (4 ranks) for all distributed checks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from distributed import run_checks, run_distributed
from parity import canonical_parameters, layout_config
from torch.utils._python_dispatch import TorchDispatchMode

from moe_train.model import build_model
from moe_train.model.init import box_runs, fill_normal_box, normal_from_pairs, stream_key
from moe_train.parallel import dist_checkpoint, materialize
from moe_train.parallel.groups import build_process_groups
from moe_train.parallel.materialize import build_parallel_model
from moe_train.parallel.parallelize import parallelize
from moe_train.parallel.param_meta import get_meta, shard_box

WORLD = 4
LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "tp2_ep2_folded": ["parallel.tp=2", "parallel.ep=2"],
    "ep4": ["parallel.ep=4"],
    "ep2_etp2": ["parallel.ep=2", "parallel.etp=2"],
    "pp2_tp2": ["parallel.pp=2", "parallel.tp=2"],
    "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved_1f1b"],
    "dp4_zero1": ["parallel.zero1=true"],
    "tp2_tied": ["parallel.tp=2", "model.tie_embeddings=true"],
}
BIG = ["model.vocab_size=2048", "model.hidden_size=64", "model.head_dim=16", "moe.expert_ffn_hidden_size=64"]
"""A model whose parameters (~1.7 MB) dwarf the RoPE tables, for the allocation bound."""


# -- single process ------------------------------------------------------------------------------


def test_stream_enters_at_any_offset() -> None:
    key = stream_key(0, "w")
    whole = np.random.Philox(key=key).random_raw(2 * 11).reshape(11, 2)
    for start in (0, 1, 2, 5, 7):
        gen = np.random.Philox(key=key)
        gen.advance(start // 2)
        part = gen.random_raw(2 * (11 - start) + 2 * (start % 2))[2 * (start % 2) :].reshape(-1, 2)
        np.testing.assert_array_equal(part, whole[start:])


def test_box_fill_equals_slice_of_full_tensor() -> None:
    shape, std = (4, 6, 10), 0.02
    full = torch.empty(shape)
    fill_normal_box(full, 3, "x", shape, [0, 0, 0], std)
    for offsets, lengths in (
        ([1, 0, 0], [2, 6, 10]),
        ([0, 3, 0], [4, 3, 10]),
        ([2, 1, 5], [1, 4, 5]),
        ([0, 0, 3], [4, 6, 1]),
    ):
        out = torch.empty(lengths)
        fill_normal_box(out, 3, "x", shape, offsets, std)
        slices = tuple(slice(o, o + n) for o, n in zip(offsets, lengths, strict=True))
        assert torch.equal(out, full[slices]), (offsets, lengths)
    runs = list(box_runs(shape, [1, 0, 0], [2, 6, 10]))
    assert runs == [(60, 120)]  # full trailing dims merge into one run
    assert len(list(box_runs(shape, [0, 0, 5], [4, 6, 5]))) == 24


def test_values_are_normal_and_keyed_by_name_and_seed() -> None:
    a, b, c = torch.empty(40000), torch.empty(40000), torch.empty(40000)
    fill_normal_box(a, 0, "w", (40000,), [0], 0.5)
    fill_normal_box(b, 0, "v", (40000,), [0], 0.5)
    fill_normal_box(c, 1, "w", (40000,), [0], 0.5)
    assert a.std().item() == pytest.approx(0.5, rel=0.02) and abs(a.mean().item()) < 0.01
    assert not torch.equal(a, b) and not torch.equal(a, c)
    z = normal_from_pairs(np.array([[0, 0], [2**64 - 1, 2**63]], dtype=np.uint64))
    assert np.isfinite(z).all()  # u1 in (0, 1]: log never sees 0


def test_build_model_is_deterministic_and_keeps_the_distributions() -> None:
    cfg = layout_config([*BIG, "model.num_layers=8", "model.init_std=0.05"], Path("unused"))
    a, b = build_model(cfg), build_model(cfg)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    out_std = 0.05 / math.sqrt(16)
    assert a.layers["1"].attention.wq.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert a.layers["1"].attention.wo.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert a.layers["1"].moe.experts.w2_EFH.std().item() == pytest.approx(out_std, rel=0.1)
    assert torch.equal(a.norm.weight, torch.ones_like(a.norm.weight))
    assert not torch.equal(a.layers["1"].attention.wq.weight, a.layers["2"].attention.wq.weight)
    assert a.rope.cos_SR.shape[0] == cfg.train.seq_len and not a.rope.cos_SR.is_meta


def test_meta_build_has_no_storage() -> None:
    model = build_model(layout_config(BIG, Path("unused")), device="meta")
    assert all(p.is_meta for p in model.parameters())


def test_dry_run_shows_the_measured_peak_next_to_the_estimate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from moe_train.cli import main

    run_dir = tmp_path / "run"
    args = ["train", "--dry-run", "--world-size", "2", "parallel.tp=2", f"run.dir={run_dir}", *BIG]
    assert main(args) == 0
    assert "measured peak memory: none yet" in capsys.readouterr().out
    run_dir.mkdir()
    lines = [{"step": 1, "peak_mem_gb": 0.5}, {"step": 1, "val_loss": {"all": 3.0}}, {"step": 2, "peak_mem_gb": 0.75}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "most loaded rank" in out and "max over ranks and steps): 0.750 GiB" in out


# -- distributed checks ---------------------------------------------------------------------------


class AllocationCounter(TorchDispatchMode):
    """Adds up the bytes of every fresh CPU tensor an op returns (views and in-place results excluded):
    the total ever allocated, so an upper bound on the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        fresh = [r.alias_info is None for r in func._schema.returns]
        outs = out if isinstance(out, tuple | list) else (out,)
        for is_fresh, t in zip(fresh, outs, strict=False):
            if is_fresh and isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.bytes += t.untyped_storage().nbytes()
        return out


def _unique_tensors(chunks: list[Any]) -> list[torch.Tensor]:
    """Parameters and persistent buffers of the chunks, each tied tensor once."""
    found = {id(t): t for chunk in chunks for t in chunk.state_dict(keep_vars=True).values()}
    return list(found.values())


def _build(rank: int, overrides: list[str], run_dir: Path) -> tuple[Any, Any, Any]:
    cfg = layout_config(overrides, run_dir)
    groups = build_process_groups(cfg, WORLD, rank)
    return cfg, groups, build_parallel_model(cfg, groups, torch.device("cpu"))


def _gathered(rank: int, overrides: list[str], root: Path) -> tuple[dict | None, dict | None]:
    cfg, groups, pm = _build(rank, overrides, root)
    gathered = canonical_parameters(pm, groups)
    reference = dict(build_model(cfg).named_parameters()) if rank == 0 else None
    return gathered, reference


def check_layouts_bitwise(rank: int, world_size: int) -> dict[str, list[str]]:
    """{layout: parameters whose gathered initial value differs from one process's} (empty = bitwise)."""
    out = {}
    for name, overrides in LAYOUTS.items():
        gathered, reference = _gathered(rank, overrides, Path("unused"))
        if rank == 0:
            assert gathered is not None and reference is not None
            assert set(gathered) == set(reference), name
            out[name] = [k for k, v in reference.items() if not torch.equal(gathered[k], v.detach())]
    return out


def check_twin_offset_zero(rank: int, world_size: int) -> list[str]:
    """Every shard initialised from offset 0 of its tensor instead of its own box: mismatches on rank 0."""

    def from_origin(meta: Any, groups: Any) -> tuple[list[int], list[int]]:
        offsets, lengths = shard_box(meta, groups)
        return [0] * len(offsets), lengths

    with mock.patch.object(materialize, "shard_box", from_origin):
        gathered, reference = _gathered(rank, LAYOUTS["tp2_ep2_folded"], Path("unused"))
    if rank != 0:
        return []
    assert gathered is not None and reference is not None
    return [k for k, v in reference.items() if not torch.equal(gathered[k], v.detach())]


def check_build_allocates_only_shards(rank: int, world_size: int) -> dict[str, int]:
    """Bytes allocated while building tp2·ep2 (folded): all fresh tensors vs this rank's shards."""
    counter = AllocationCounter()
    with counter:
        cfg, _, pm = _build(rank, [*BIG, "parallel.tp=2", "parallel.ep=2"], Path("unused"))
    local = sum(t.numel() * t.element_size() for t in _unique_tensors(pm.chunks))
    rope = sum(b.numel() * b.element_size() for chunk in pm.chunks for b in chunk.buffers() if b.dim() == 2)
    full = sum(t.numel() * t.element_size() for t in _unique_tensors([build_model(cfg, device="meta")]))
    buckets = sum(b.buffer.numel() * b.buffer.element_size() for b in pm.reducer.buckets)  # gradient buffers
    twin = AllocationCounter()  # the old way: the whole model on every rank, then sliced
    with twin:
        parallelize(build_model(cfg), build_process_groups(cfg, WORLD, rank), cfg)
    return {
        "allocated": counter.bytes,
        "local": local,
        "rope": rope,
        "full": full,
        "grad_buckets": buckets,
        "full_then_slice": twin.bytes,
    }


def check_checkpoint_reads_only_own_boxes(rank: int, world_size: int, root: Path) -> dict[str, int]:
    """Save under tp2 (dp2), load under ep2·etp2 and tp2·ep2: elements copied out of the files per rank."""
    from moe_train.parallel.dist_checkpoint import load_distributed_checkpoint, save_distributed_checkpoint
    from moe_train.train.checkpoint import TrainState

    cfg, groups, pm = _build(rank, [*BIG, "parallel.tp=2"], root)
    path = save_distributed_checkpoint(root, TrainState(1, 8), pm.chunks, None, groups, {}, 1)
    readers: list[Any] = []
    original = dist_checkpoint._Reader

    def recording_reader(p: Path) -> Any:
        readers.append(original(p))
        return readers[-1]

    out = {}
    for name in ("ep2_etp2", "tp2_ep2_folded"):
        _, groups2, pm2 = _build(rank, [*BIG, *LAYOUTS[name]], root)
        with mock.patch.object(dist_checkpoint, "_Reader", recording_reader):
            load_distributed_checkpoint(path, pm2.chunks, None, groups2)
        out[name] = readers[-1].elements_read
        out[f"{name}_local"] = sum(math.prod(shard_box(get_meta(t), groups2)[1]) for t in _unique_tensors(pm2.chunks))
    out["full"] = sum(t.numel() for t in _unique_tensors([build_model(cfg, device="meta")]))
    with mock.patch.object(dist_checkpoint, "_Reader", recording_reader):  # twin: a reader of whole tensors
        dist_checkpoint.load_canonical_tensors(path)
    out["whole_read"] = readers[-1].elements_read
    return out


def check_training_holds_only_shards(rank: int, world_size: int, root: Path) -> dict[str, float]:
    """One tp2·ep2 training step through the Trainer: this rank's parameter bytes and the reported peak."""
    from moe_train.train.trainer import Trainer

    overrides = [*BIG, "parallel.tp=2", "parallel.ep=2", "train.max_steps=1", "train.eval_every=0"]
    cfg = layout_config(overrides, root / "train")
    trainer = Trainer(cfg, build_process_groups(cfg, WORLD, rank))
    record = trainer.fit()[-1]
    local = sum(p.numel() * p.element_size() for p in trainer.pmodel.parameters())
    full = sum(t.numel() * t.element_size() for t in _unique_tensors([build_model(cfg, device="meta")]))
    return {"local": local, "full": full, "peak_mem_gb": record["peak_mem_gb"]}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("meta_init")
    checks = [check_layouts_bitwise, check_twin_offset_zero, check_build_allocates_only_shards]
    checks += [
        _WithRoot(check_checkpoint_reads_only_own_boxes, root),
        _WithRoot(check_training_holds_only_shards, root),
    ]
    return run_distributed(run_checks, WORLD, checks, timeout=600)


class _WithRoot:
    """A picklable check carrying the shared temporary directory."""

    def __init__(self, check: Any, root: Path) -> None:
        self.check, self.root = check, root
        self.__name__ = check.__name__

    def __call__(self, rank: int, world_size: int) -> Any:
        return self.check(rank, world_size, self.root)


def test_every_layout_starts_bitwise_equal_to_one_process(results: list[dict[str, Any]]) -> None:
    mismatches = results[0]["check_layouts_bitwise"]
    assert set(mismatches) == set(LAYOUTS)
    assert not any(mismatches.values()), mismatches


def test_twin_shards_from_offset_zero_are_caught(results: list[dict[str, Any]]) -> None:
    wrong = results[0]["check_twin_offset_zero"]
    assert any("experts.w1_EHF" in k for k in wrong) and any("attention.wq" in k for k in wrong), wrong


def test_build_allocates_only_the_ranks_shards(results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(results):  # the working block lives in numpy, bounded by INIT_BLOCK_ELEMS
        m = r["check_build_allocates_only_shards"]
        assert m["local"] < 0.6 * m["full"], (rank, m)
        bound = m["local"] + m["grad_buckets"] + 3 * m["rope"] + 4096  # RoPE: angles, cos, sin
        assert m["allocated"] <= bound, (rank, m)
        assert m["grad_buckets"] <= m["local"], (rank, m)
        assert m["full_then_slice"] >= m["full"] + m["local"], (rank, m)  # twin: the counter sees a whole model


def test_checkpoint_load_reads_only_own_boxes(results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(results):
        m = r["check_checkpoint_reads_only_own_boxes"]
        for name in ("ep2_etp2", "tp2_ep2_folded"):  # exactly the elements of the rank's own boxes
            assert m[name] == m[f"{name}_local"], (rank, name, m)
        assert m["tp2_ep2_folded"] < 0.6 * m["full"], (rank, m)  # ep2_etp2 keeps the dense part whole (dp4)
        assert m["whole_read"] == m["full"], (rank, m)  # twin: the count does see a whole-model read


def test_training_ranks_hold_a_fraction_of_the_model(results: list[dict[str, Any]]) -> None:
    peaks = {r["check_training_holds_only_shards"]["peak_mem_gb"] for r in results}
    assert len(peaks) == 1 and peaks.pop() > 0  # the max over ranks, the same on every rank
    for rank, r in enumerate(results):
        m = r["check_training_holds_only_shards"]
        assert m["local"] < 0.6 * m["full"], (rank, m)
