"""Trainer: bitwise resume, run-directory safety, metrics outputs, bad input through the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_train.config import Config, load_config
from moe_train.train import checkpoint as ckpt
from moe_train.train.optim import build_optimizer
from moe_train.train.trainer import RunDirError, Trainer

TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=8",
    "model.ffn_hidden_size=64",
    "model.vocab_size=128",
    "moe.num_experts=4",
    "moe.top_k=2",
    "moe.expert_ffn_hidden_size=32",
    "moe.zloss_coeff=0.001",
    "data.mock=true",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.seq_len=16",
    "train.eval_every=0",
    "train.log_every=1",
    "optim.warmup_steps=2",
    "optim.lr=1e-2",
    "log.tensorboard=false",
]


def tiny_config(run_dir: Path, *extra: str) -> Config:
    return load_config(None, [*TINY, f"run.dir={run_dir}", *extra])


def _losses(records: list[dict]) -> list[tuple[float, float, float, float]]:
    return [(r["loss"], r["lm_loss"], r["lbl"], r["grad_norm"]) for r in records]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    run_dir = tmp_path_factory.mktemp("full")
    trainer = Trainer(tiny_config(run_dir, "train.max_steps=6", "checkpoint.every=3", "checkpoint.keep_last=3"))
    return run_dir, trainer.fit()


def test_run_writes_outputs(full_run: tuple[Path, list[dict]]) -> None:
    run_dir, records = full_run
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    for key in ("step", "loss", "lm_loss", "lbl", "zloss", "lr", "grad_norm", "tokens", "tokens_per_s"):
        assert all(key in line for line in lines), key
    assert lines[-1]["tokens"] == 6 * 8 * 16
    assert load_config(run_dir / "config.yaml") == tiny_config(
        run_dir, "train.max_steps=6", "checkpoint.every=3", "checkpoint.keep_last=3"
    )
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_00000003", "step_00000006"]
    assert all(r["loss"] > r["lm_loss"] > 0 for r in records)


def _resume_from_step3(full_dir: Path, tmp_path: Path) -> Trainer:
    run_dir = tmp_path / "resumed"
    shutil.copytree(full_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
    return Trainer(tiny_config(run_dir, "train.max_steps=6", "checkpoint.every=3", "checkpoint.resume=latest"))


def test_resume_is_bitwise_equal(full_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    full_dir, records = full_run
    trainer = _resume_from_step3(full_dir, tmp_path)
    assert trainer.state == ckpt.TrainState(step=3, consumed_samples=24)
    resumed = trainer.fit()
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert _losses(resumed) == _losses(records[3:])  # exact float equality
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_without_optimizer_state_differs(full_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    """Twin: the resume test detects a resume that loses the optimizer state."""
    full_dir, records = full_run
    trainer = _resume_from_step3(full_dir, tmp_path)
    trainer.optimizer = build_optimizer(trainer.model, trainer.cfg.optim)
    resumed = trainer.fit()
    assert _losses(resumed)[1:] != _losses(records[3:])[1:]


def test_resume_with_another_global_batch_continues_at_consumed_samples(
    full_run: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    run_dir = tmp_path / "resumed"
    shutil.copytree(full_run[0], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
    cfg = tiny_config(run_dir, "train.max_steps=6", "train.global_batch_size=4", "checkpoint.resume=latest")
    trainer = Trainer(cfg)
    assert trainer.state.consumed_samples == 24
    batch = trainer.micro_batches(trainer.state.consumed_samples)[0]
    assert torch.equal(batch.tokens_BS, trainer.source.get_batch([24, 25]).tokens_BS)
    assert not torch.equal(batch.tokens_BS, trainer.source.get_batch([12, 13]).tokens_BS)


def test_bf16_loss_close_to_fp32(tmp_path: Path) -> None:
    fp32 = Trainer(tiny_config(tmp_path / "a", "train.max_steps=2")).fit()
    bf16 = Trainer(tiny_config(tmp_path / "b", "train.max_steps=2", "train.precision=bf16")).fit()
    for a, b in zip(fp32, bf16, strict=True):
        assert abs(a["lm_loss"] - b["lm_loss"]) < 0.02 * a["lm_loss"]
        assert a["lm_loss"] != b["lm_loss"]  # bf16 autocast really ran


def test_fresh_run_refuses_existing_run_dir(full_run: tuple[Path, list[dict]]) -> None:
    run_dir, _ = full_run
    before = sorted(p.name for p in ckpt.list_checkpoints(run_dir))
    with pytest.raises(RunDirError, match="already holds checkpoints"):
        Trainer(tiny_config(run_dir, "train.max_steps=6"))
    assert sorted(p.name for p in ckpt.list_checkpoints(run_dir)) == before


def test_loss_falls_on_mock_data_repeated(tmp_path: Path) -> None:
    """A memorisable stream (one repeated global batch) must be learned: the optimizer loop works."""
    trainer = Trainer(tiny_config(tmp_path / "r", "train.max_steps=30", "checkpoint.every=0"))
    first = trainer.micro_batches(0)
    trainer.micro_batches = lambda first_sample: first  # type: ignore[method-assign]
    records = trainer.fit()
    assert records[-1]["lm_loss"] < 0.7 * records[0]["lm_loss"]


def test_bf16_autocast_step_runs(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path / "bf", "train.max_steps=1", "train.precision=bf16"))
    records = trainer.fit()
    assert torch.isfinite(torch.tensor(records[0]["loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_train.cli", *args], capture_output=True, text=True, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("moe-train: error:")
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_cli_bad_config_and_missing_data(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _assert_one_line_error(_cli("train", "moe.top_k=99", f"run.dir={run_dir}"), "moe.top_k (99)")
    proc = _cli("train", f"data.dir={tmp_path / 'nowhere'}", f"run.dir={run_dir}")
    _assert_one_line_error(proc, "nowhere", "moe-train data build")
    assert not (run_dir / "checkpoints").exists()


def test_cli_world_size_needs_dry_run(tmp_path: Path) -> None:
    _assert_one_line_error(_cli("train", *TINY, f"run.dir={tmp_path}", "--world-size", "4"), "--world-size")


def test_cli_resume_without_checkpoint(tmp_path: Path) -> None:
    proc = _cli("train", *TINY, f"run.dir={tmp_path}", "--resume")
    _assert_one_line_error(proc, "holds no checkpoint")


def test_cli_inspect_prints_counts() -> None:
    proc = _cli("inspect", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "total" in proc.stdout and "active" in proc.stdout and "FLOPs per token" in proc.stdout


def test_cli_dry_run_prints_layout_and_rejects_bad_layout() -> None:
    proc = _cli("train", "--dry-run", "--world-size", "8", *TINY, "parallel.tp=2", "parallel.ep=4")
    assert proc.returncode == 0, proc.stderr
    assert "attention [pp 1, dp 4, tp 2]" in proc.stdout and "experts [pp 1, edp 2, ep 4, etp 1]" in proc.stdout
    assert "ep             2 x 4     [0, 1, 2, 3] [4, 5, 6, 7]" in proc.stdout
    _assert_one_line_error(_cli("train", "--dry-run", "--world-size", "6", *TINY, "parallel.tp=4"), "world size (6)")
