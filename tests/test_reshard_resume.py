"""A run saved under one layout resumes under another and continues with the single-process losses.

Layout A (pp2·ep2 with ZeRO-1, 4 ranks) trains 3 of 5 steps and checkpoints; the run is resumed under
layout B (tp2 on 2 ranks) and in a single process. Steps 4-5 must equal the uninterrupted
single-process run (fp32 tolerance), which also proves the data position was carried over.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from distributed import run_distributed
from parity import RECORD_KEYS, layout_config, record_errors, reference_run

from moe_train.parallel.groups import build_process_groups
from moe_train.train import checkpoint as ckpt
from moe_train.train.optim import build_optimizer
from moe_train.train.trainer import Trainer

SAVE_LAYOUT = ["parallel.pp=2", "parallel.ep=2", "parallel.zero1=true", "checkpoint.every=3"]


def _train(rank: int, world_size: int, overrides: list[str], run_dir: Path) -> list[dict]:
    cfg = layout_config(overrides, run_dir)
    trainer = Trainer(cfg, build_process_groups(cfg, world_size, rank))
    return [{k: r[k] for k in RECORD_KEYS} | {"step": r["step"]} for r in trainer.fit()]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reshard") / "run"
    run_distributed(_train, 4, SAVE_LAYOUT, run_dir, timeout=600)
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_00000003", "step_00000005"]
    shutil.rmtree(run_dir / "checkpoints" / "step_00000005")
    return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    records = reference_run([], tmp_path_factory.mktemp("ref") / "run")["records"]
    return [r | {"step": i} for i, r in enumerate(records, start=1)]


def _copy(saved: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(saved, run_dir)
    return run_dir


def test_resume_in_single_process(saved: Path, reference: list[dict], tmp_path: Path) -> None:
    run_dir = _copy(saved, tmp_path)
    trainer = Trainer(layout_config(["checkpoint.resume=latest"], run_dir))
    assert trainer.state == ckpt.TrainState(step=3, consumed_samples=24)
    records = [{k: r[k] for k in RECORD_KEYS} | {"step": r["step"]} for r in trainer.fit()]
    assert [r["step"] for r in records] == [4, 5]
    assert not record_errors(records, reference[3:])


def test_resume_under_tensor_parallel(saved: Path, reference: list[dict], tmp_path: Path) -> None:
    run_dir = _copy(saved, tmp_path)
    results = run_distributed(_train, 2, ["parallel.tp=2", "checkpoint.resume=latest"], run_dir, timeout=600)
    assert [r["step"] for r in results[0]] == [4, 5]
    assert not record_errors(results[0], reference[3:])


def test_resume_without_resharded_optimizer_state_differs(saved: Path, reference: list[dict], tmp_path: Path) -> None:
    """Twin: dropping the ZeRO-sharded Adam state on the way to one process is detected."""
    run_dir = _copy(saved, tmp_path)
    trainer = Trainer(layout_config(["checkpoint.resume=latest"], run_dir))
    trainer.optimizer = build_optimizer(trainer.pmodel, trainer.cfg.optim)
    records = [{k: r[k] for k in RECORD_KEYS} | {"step": r["step"]} for r in trainer.fit()]
    assert record_errors(records, reference[3:])
