"""Routing analytics on a real multi-domain corpus: per-step domain x expert counts from the trainer,
TensorBoard heatmaps, and `moe-train inspect RUN_DIR` (PNG per layer + routing.json), bad input included.

The corpus is four small subpackages of the Python standard library (local, no network).
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from moe_train.cli import main
from moe_train.config import load_config
from moe_train.data import BuildOptions, build_dataset, input_source
from moe_train.train.trainer import Trainer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DOMAINS = {"json": "json", "email": "email", "http": "http", "tests": "unittest"}
MODEL = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.head_dim=16",
    "model.ffn_hidden_size=64",
    "model.vocab_size=512",
    "moe.num_experts=4",
    "moe.top_k=2",
    "moe.expert_ffn_hidden_size=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.seq_len=32",
    "train.eval_batches=2",
    "train.eval_every=0",
    "train.max_steps=2",
    "checkpoint.every=2",
    "log.routing_every=2",
    "moe.lbl.scope=global",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trainer]:
    root = tmp_path_factory.mktemp("routing")
    sources = [input_source(f"{name}={STDLIB / sub}") for name, sub in DOMAINS.items()]
    data = root / "corpus"
    build_dataset(BuildOptions(data, sources, vocab_size=512, max_bytes=150_000, val_min_bytes=8_000))
    run = root / "run"
    trainer = Trainer(load_config(None, [*MODEL, f"data.dir={data}", f"run.dir={run}"]))
    trainer.routing = []  # type: ignore[attr-defined]
    step = trainer.train_step
    trainer.train_step = lambda: trainer.routing.append(r := step()) or r  # type: ignore[attr-defined, method-assign, func-returns-value]
    trainer.batches = []  # type: ignore[attr-defined]
    draw = trainer.micro_batches  # the sampler hands out each step's batches once, in order: keep them
    trainer.micro_batches = lambda first: trainer.batches.append(b := draw(first)) or b  # type: ignore[attr-defined, method-assign, func-returns-value]
    trainer.fit()
    return run, trainer


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_train.cli", *args], capture_output=True, text=True, timeout=300)


def test_step_counts_follow_the_domains_of_the_batch(run_dir: tuple[Path, Trainer]) -> None:
    run, trainer = run_dir
    assert len(trainer.batches) == len(trainer.routing) > 0  # type: ignore[attr-defined]
    for step, result in enumerate(trainer.routing):  # type: ignore[attr-defined]
        counts_LDE = result.routing_counts_LDE
        assert counts_LDE.shape == (2, 4, 4)
        batches = trainer.batches[step]  # type: ignore[attr-defined]
        per_domain = torch.bincount(torch.cat([b.domain_B for b in batches]), minlength=4)
        for counts_DE in counts_LDE:  # every layer: each domain's sequences x 32 tokens x top-2
            assert counts_DE.sum(1).tolist() == (per_domain * 32 * 2).tolist()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= line["routing_specialisation"] <= 1.0 and line["load_imbalance"] >= 1.0 for line in lines)
    events = b"".join(p.read_bytes() for p in (run / "tb").rglob("events.*"))
    assert b"routing/layer1_domain_expert" in events and b"routing/layer0_specialisation" in events


def test_inspect_run_dir_writes_heatmaps_and_scores(run_dir: tuple[Path, Trainer], tmp_path: Path) -> None:
    run, _ = run_dir
    proc = _cli("inspect", str(run))
    assert proc.returncode == 0, proc.stderr
    out = run / "inspect" / "step_00000002"
    report = json.loads((out / "routing.json").read_text())
    assert report["domains"] == list(DOMAINS) and [e["layer"] for e in report["layers"]] == [0, 1]
    for entry in report["layers"]:
        assert (out / f"layer_{entry['layer']:02d}.png").read_bytes()[:4] == b"\x89PNG"
        assert 0.0 <= entry["specialisation"] <= 1.0 and 1.0 <= entry["load_imbalance"] <= 4.0
        assert all(sum(shares) == pytest.approx(1.0) for shares in entry["shares"].values())
    assert "specialisation" in proc.stdout and str(out) in proc.stdout
    checkpoint = run / "checkpoints" / "step_00000002"
    assert main(["inspect", "--out", str(tmp_path / "a"), str(checkpoint), "train.eval_batches=1"]) == 0
    assert (tmp_path / "a" / "layer_01.png").is_file()


def test_inspect_bad_input_is_one_line_and_writes_nothing(
    run_dir: tuple[Path, Trainer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = run_dir
    for args in (
        [str(tmp_path / "missing")],
        [str(tmp_path)],  # a directory without checkpoints
        [str(run), str(run)],
        [str(run), "data.dir=/nonexistent"],
        ["--config", "configs/tiny_cpu.yaml", str(run)],
    ):
        capsys.readouterr()
        assert main(["inspect", "--out", str(tmp_path / "out"), *args]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("moe-train: error:"), (args, err)
        assert not (tmp_path / "out").exists()
