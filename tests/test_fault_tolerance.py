"""Fault tolerance in one process: verified checkpoints with fallback, NaN / spike steps skipped with
later losses equal to a run that never trained on the bad batch, preemption (SIGTERM → save, exit 0,
bit-for-bit requeue) and the watchdog. Multi-rank kills and hangs: tests/test_fault_restart.py."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from pathlib import Path

import pytest
from test_train import TINY, tiny_config

from moe_train import cli
from moe_train.config import WatchdogConfig
from moe_train.parallel.checkpoint_files import (
    MANIFEST,
    CheckpointError,
    TrainState,
    list_checkpoints,
    resolve_resume,
    verify_checkpoint,
)
from moe_train.train.anomaly import AnomalyError
from moe_train.train.faults import ENV
from moe_train.train.trainer import Trainer
from moe_train.train.watchdog import Watchdog
from moe_train.utils.phases import PhaseTracker

STEPS = 6
BAD = 3  # 0-based step whose batch is bad (metrics step 4)
RUN = ["data.ledger=true", f"train.max_steps={STEPS}", "optim.schedule=constant", "optim.warmup_steps=0"]


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The uninterrupted run (checkpoints at steps 2, 4, 6)."""
    run_dir = tmp_path_factory.mktemp("clean")
    records = Trainer(tiny_config(run_dir, *RUN, "checkpoint.every=2", "checkpoint.keep_last=3")).fit()
    return run_dir, records


def _never_seeing(run_dir: Path, dropped: set[int], *extra: str) -> dict[int, float]:
    """Losses of a run that never trains on the batches of the 0-based steps `dropped`: the same data
    order, those batches handed out by the sampler and dropped (no forward, no update); the step counter
    moves on (LR schedule)."""
    trainer = Trainer(tiny_config(run_dir, *RUN, "checkpoint.every=0", *extra))
    losses = {}
    for step in range(trainer.cfg.train.max_steps):
        if step in dropped:
            trainer.micro_batches(trainer.state.consumed_samples)
        else:
            losses[step + 1] = trainer.train_step().loss
        trainer.state = TrainState(step + 1, trainer.state.consumed_samples + trainer.cfg.train.global_batch_size)
    return losses


@pytest.fixture(scope="module")
def without_bad_batch(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Losses of a run that never trains on the batch of step BAD."""
    return _never_seeing(tmp_path_factory.mktemp("ref"), {BAD})


# -- verified checkpoints ------------------------------------------------------------------------


def _copy(clean: tuple[Path, list[dict]], tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(clean[0], run_dir)
    return run_dir


def test_manifest_lists_every_file(clean: tuple[Path, list[dict]]) -> None:
    newest = list_checkpoints(clean[0])[-1]
    manifest = json.loads((newest / MANIFEST).read_text())
    names = {p.name for p in newest.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == names and "shard_00000.pt" in names
    assert verify_checkpoint(newest) is None


def test_truncated_checkpoint_falls_back(
    clean: tuple[Path, list[dict]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = _copy(clean, tmp_path)
    newest = list_checkpoints(run_dir)[-1]
    shard = newest / "shard_00000.pt"
    shard.write_bytes(shard.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING):
        chosen = resolve_resume(run_dir, "latest")
    assert chosen == list_checkpoints(run_dir)[-2]
    assert str(newest) in caplog.text and "truncated" in caplog.text
    with pytest.raises(CheckpointError, match="fails verification"):
        resolve_resume(run_dir, str(newest))
    trainer = Trainer(tiny_config(run_dir, *RUN, "checkpoint.every=2", "checkpoint.resume=latest"))
    assert trainer.state.step == 4


def test_bit_flip_refused_and_size_mode_twin(clean: tuple[Path, list[dict]], tmp_path: Path) -> None:
    run_dir = _copy(clean, tmp_path)
    newest = list_checkpoints(run_dir)[-1]
    shard = newest / "shard_00000.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_resume(run_dir, str(newest))
    assert resolve_resume(run_dir, "auto") == list_checkpoints(run_dir)[-2]
    # twin: size-only verification cannot see a flipped bit
    assert resolve_resume(run_dir, str(newest), verify="size") == newest
    # the checksums are shared out over ranks: only the rank owning the damaged file sees the flip
    names = sorted(json.loads((newest / MANIFEST).read_text())["files"])
    index = names.index("shard_00000.pt")
    assert verify_checkpoint(newest, "sha256", rank=index % 2, world_size=2) is not None
    assert verify_checkpoint(newest, "sha256", rank=1 - index % 2, world_size=2) is None


def test_no_manifest_is_accepted_with_warning(
    clean: tuple[Path, list[dict]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = _copy(clean, tmp_path)
    newest = list_checkpoints(run_dir)[-1]
    (newest / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(run_dir, "latest") == newest
    assert "cannot be verified" in caplog.text


def test_size_only_manifest(tmp_path: Path) -> None:
    """checkpoint.verify=size: no checksums written (nothing read back on save), truncation still caught."""
    Trainer(tiny_config(tmp_path, "train.max_steps=1", "checkpoint.verify=size")).fit()
    (newest,) = list_checkpoints(tmp_path)
    files = json.loads((newest / MANIFEST).read_text())["files"]
    assert all(entry["sha256"] is None for entry in files.values()) and verify_checkpoint(newest) is None
    _truncate_bytes = (newest / "trainer.pt").read_bytes()[:-1]
    (newest / "trainer.pt").write_bytes(_truncate_bytes)
    assert "truncated" in str(verify_checkpoint(newest))


def test_every_checkpoint_damaged_is_refused(clean: tuple[Path, list[dict]], tmp_path: Path) -> None:
    run_dir = _copy(clean, tmp_path)
    for path in list_checkpoints(run_dir):
        (path / "trainer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint .* verifies"):
        resolve_resume(run_dir, "latest")


# -- anomalies -----------------------------------------------------------------------------------


def _later(losses: dict[int, float]) -> list[float]:
    return [losses[s] for s in range(BAD + 2, STEPS + 1)]


def test_nan_gradient_skipped_like_a_run_without_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, without_bad_batch: dict[int, float]
) -> None:
    monkeypatch.setenv(ENV, f"nan_grad,step={BAD}")
    records = Trainer(tiny_config(tmp_path, *RUN, "checkpoint.every=0")).fit()
    assert [r["skipped"] for r in records] == [int(s == BAD) for s in range(STEPS)]
    assert records[-1]["anomaly_nan"] == 1 and records[-1]["anomaly_spike"] == 0
    assert _later(_losses(records)) == _later(without_bad_batch)
    logged = [json.loads(line) for line in (tmp_path / "anomalies.jsonl").read_text().splitlines()]
    assert logged[0]["step"] == BAD + 1 and logged[0]["kind"] == "nan" and len(logged[0]["samples"]) == 8


def test_spike_skipped_and_twin_without_detection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, without_bad_batch: dict[int, float]
) -> None:
    monkeypatch.setenv(ENV, f"spike,step={BAD},scale=30")
    # a 3-step window of a tiny model has a tiny std: the injected spike is ~30,000 std out, ordinary
    # steps reach ~7, so 1000 separates them with room on both sides
    spike = ["train.anomaly.spike_zscore=1000", "train.anomaly.window=3", "checkpoint.every=0"]
    records = Trainer(tiny_config(tmp_path / "on", *RUN, *spike)).fit()
    assert [r["skipped"] for r in records] == [int(s == BAD) for s in range(STEPS)]
    assert records[-1]["anomaly_spike"] == 1
    assert _later(_losses(records)) == _later(without_bad_batch)
    twin = Trainer(tiny_config(tmp_path / "off", *RUN, "checkpoint.every=0")).fit()  # detection off
    assert twin[BAD]["skipped"] == 0 and _later(_losses(twin)) != _later(without_bad_batch)


def test_spike_rollback_skips_back_to_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spike at step 6 (0-based 5), checkpoint at step 4: steps 5-6 are replayed as skipped."""
    monkeypatch.setenv(ENV, "spike,step=5,scale=30")
    spike = ["train.anomaly.spike_zscore=1000", "train.anomaly.window=3", "train.anomaly.on_spike=rollback"]
    run_dir = tmp_path / "rollback"
    records = Trainer(tiny_config(run_dir, *RUN, "train.max_steps=8", "checkpoint.every=4", *spike)).fit()
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["skipped"] for r in records] == [0, 0, 0, 0, 1, 1, 0, 0]
    reference = _never_seeing(tmp_path / "ref", {4, 5}, "train.max_steps=8")
    assert [r["loss"] for r in records[6:]] == [reference[7], reference[8]]
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 9)
    )
    ledger_steps = [json.loads(line)["step"] for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert ledger_steps == [s for s in range(1, 9) for _ in range(8)]  # each step's batch once
    skip_only = _never_seeing(tmp_path / "ref_skip", {5}, "train.max_steps=8")  # twin: skip is not rollback
    assert [r["loss"] for r in records[6:]] != [skip_only[7], skip_only[8]]


def test_consecutive_anomalies_stop_naming_step_and_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, f"nan_grad,step={BAD};nan_grad,step={BAD + 1}")
    cfg = tiny_config(tmp_path / "k", *RUN, "checkpoint.every=0", "train.anomaly.max_consecutive=1")
    with pytest.raises(AnomalyError, match=rf"at step {BAD + 2}: nan .*data: domain \w+: samples \d+"):
        Trainer(cfg).fit()
    monkeypatch.setenv(ENV, f"nan_grad,step={BAD}")
    cfg = tiny_config(tmp_path / "stop", *RUN, "checkpoint.every=0", "train.anomaly.on_nan=stop")
    with pytest.raises(AnomalyError, match=f"at step {BAD + 1}"):
        Trainer(cfg).fit()


# -- preemption ----------------------------------------------------------------------------------


def _metric_losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines}


def test_sigterm_saves_exits_0_and_requeue_is_bitwise(
    clean: tuple[Path, list[dict]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = [*TINY, *RUN, f"run.dir={tmp_path}", "checkpoint.every=0", "checkpoint.resume=auto"]
    monkeypatch.setenv(ENV, "sigterm,step=2")
    assert cli.main(["train", *overrides]) == 0
    # the bound: the step the signal arrived in is finished, one checkpoint written, nothing more trained
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003"]
    assert sorted(_metric_losses(tmp_path)) == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    monkeypatch.delenv(ENV)
    assert cli.main(["train", *overrides]) == 0  # the requeued job
    assert _metric_losses(tmp_path) == _metric_losses(clean[0])
    assert (tmp_path / "ledger.jsonl").read_text() == (clean[0] / "ledger.jsonl").read_text()


def test_sigusr1_and_twin_without_signal_handling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "sigusr1,step=1")
    records = Trainer(tiny_config(tmp_path / "usr1", *RUN, "checkpoint.every=0")).fit()
    assert [r["step"] for r in records] == [1, 2]
    assert [p.name for p in list_checkpoints(tmp_path / "usr1")] == ["step_00000002"]
    # twin: with train.save_on_signal=false the process's own SIGTERM action runs (here: raise), no save
    monkeypatch.setenv(ENV, "sigterm,step=1")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            Trainer(tiny_config(tmp_path / "off", *RUN, "checkpoint.every=0", "train.save_on_signal=false")).fit()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list_checkpoints(tmp_path / "off") == []


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def test_collective_timeout_reaches_init_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from moe_train.parallel import launch

    seen: dict = {}

    def fake_init(**kwargs: object) -> None:
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(dist, "init_process_group", fake_init)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    cfg = tiny_config(Path("unused"), "parallel.collective_timeout_s=42", "parallel.backend=gloo")
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(RuntimeError, match="stop here"):
        launch.init_distributed(cfg, env)
    assert seen["timeout"].total_seconds() == 42


# -- watchdog ------------------------------------------------------------------------------------


def test_watchdog_names_phase_after_warmup() -> None:
    tracker, exits = PhaseTracker(), []
    cfg = WatchdogConfig(multiple=3.0, floor_s=0.05, warmup_steps=2, poll_s=0.01)
    dog = Watchdog(cfg, rank=5, tracker=tracker, exit_fn=exits.append)
    dog.step_started(0)
    time.sleep(0.1)  # warm-up steps are never judged
    assert dog.check() is None
    dog.step_finished(0.01)
    dog.step_finished(0.01)
    dog.start()
    with tracker.phase("step"), tracker.phase("grad reduce"):
        dog.step_started(2)
        deadline = time.monotonic() + 30
        while not exits and time.monotonic() < deadline:
            time.sleep(0.01)
    dog.stop()
    assert exits == [cfg.exit_code]
    assert dog.fired is not None and "rank 5" in dog.fired and "phase 'grad reduce'" in dog.fired
