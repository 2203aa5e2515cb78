"""LR schedules and the atomic checkpoint store."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moe_train.config import OptimConfig
from moe_train.parallel.dist_checkpoint import load_distributed_checkpoint, save_distributed_checkpoint
from moe_train.parallel.groups import ProcessGroups
from moe_train.train import checkpoint as ckpt
from moe_train.train.schedule import lr_at


def test_cosine_schedule_endpoints() -> None:
    o = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, o, 110) == pytest.approx(0.1)
    assert lr_at(9, o, 110) == pytest.approx(1.0)
    assert lr_at(10, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, o, 110) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_linear() -> None:
    o = OptimConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    assert lr_at(2, o, 100) == pytest.approx(2.0 * 3 / 5)
    assert all(lr_at(s, o, 100) == 2.0 for s in range(5, 80))
    assert lr_at(90, o, 100) == pytest.approx(1.0)
    assert lr_at(100, o, 100) == pytest.approx(0.0)


def test_constant_schedule() -> None:
    o = OptimConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert {lr_at(s, o, 10) for s in range(10)} == {0.5}


def _model(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(-value)
    return model


def _save(run_dir: Path, step: int, keep_last: int = 2) -> Path:
    state = ckpt.TrainState(step, step * 4)
    groups = ProcessGroups.single()
    return save_distributed_checkpoint(run_dir, state, _model(float(step)), None, groups, {"k": 1}, keep_last)


def _load(path: Path) -> tuple[ckpt.TrainState, torch.nn.Module, dict]:
    model = _model(0.0)
    state, rng = load_distributed_checkpoint(path, model, None, ProcessGroups.single())
    return state, model, rng


def test_save_load_and_keep_last(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save(tmp_path, step)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000002", "step_00000003"]
    state, model, rng = _load(ckpt.resolve_resume(tmp_path, "latest"))  # type: ignore[arg-type]
    assert state == ckpt.TrainState(3, 12)
    assert torch.equal(model.weight, torch.full((2, 3), 3.0)) and torch.equal(model.bias, torch.full((2,), -3.0))
    assert set(rng) == {"torch", "python", "numpy", "cuda"}


def test_crash_during_save_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = _save(tmp_path, 5)
    real_save = torch.save

    def crashing_save(obj: object, path: object, *args: object, **kwargs: object) -> None:
        if "trainer.pt" in str(getattr(path, "name", path)):
            path.write(b"partial")  # type: ignore[attr-defined]
            raise KeyboardInterrupt("simulated crash mid-save")
        real_save(obj, path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 6)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.list_checkpoints(tmp_path) == [good]
    state, model, _ = _load(good)
    assert state.step == 5 and torch.equal(model.weight, torch.full((2, 3), 5.0))
    _save(tmp_path, 7)
    assert sorted(p.name for p in ckpt.checkpoint_root(tmp_path).iterdir()) == ["step_00000005", "step_00000007"]


def test_stale_temp_dir_is_ignored_and_cleaned(tmp_path: Path) -> None:
    root = ckpt.checkpoint_root(tmp_path)
    (root / ".tmp-step_00000009").mkdir(parents=True)
    assert ckpt.list_checkpoints(tmp_path) == []
    _save(tmp_path, 1)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]


def test_resume_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="holds no checkpoint"):
        ckpt.resolve_resume(tmp_path, "latest")
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint directory"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "nope"))
    bad = _save(tmp_path, 1)
    next(bad.glob("shard_*.pt")).write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        _load(bad)


def test_resaving_a_step_replaces_it_and_leaves_no_temp(tmp_path: Path) -> None:
    _save(tmp_path, 4)
    state = ckpt.TrainState(4, 99)
    save_distributed_checkpoint(tmp_path, state, _model(7.0), None, ProcessGroups.single(), {}, 2)
    assert [p.name for p in ckpt.checkpoint_root(tmp_path).iterdir()] == ["step_00000004"]
    loaded, model, _ = _load(ckpt.checkpoint_root(tmp_path) / "step_00000004")
    assert loaded == state and torch.equal(model.weight, torch.full((2, 3), 7.0))
