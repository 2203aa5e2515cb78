"""The real launch path: `torchrun -m moe_train.cli train` on CPU (gloo chosen automatically).

Two ranks with tp2 train 3 steps from the command line; rank 0 writes the run directory and the losses
equal the single-process run of the same config. A user error under torchrun is printed once, not once
per rank.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from parity import BASE

from moe_train.config import load_config
from moe_train.train.trainer import Trainer

STEPS = ["train.max_steps=3", "train.eval_every=0"]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_cli_matches_single_process(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    run_dir = tmp_path / "tp2"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "moe_train.cli", "train"]
    proc = subprocess.run(
        [*cmd, *BASE, *STEPS, "parallel.tp=2", f"run.dir={run_dir}"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert load_config(run_dir / "config.yaml").parallel.tp == 2
    reference = Trainer(load_config(None, [*BASE, *STEPS, f"run.dir={tmp_path / 'single'}"])).fit()
    for got, want in zip(lines, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5, abs=1e-6)


@pytest.mark.skipif(TORCHRUN is None, reason="no torchrun")
def test_torchrun_user_error_printed_once(tmp_path: Path) -> None:
    assert TORCHRUN is not None
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "moe_train.cli", "train"]
    proc = subprocess.run(
        [*cmd, *BASE, "moe.top_k=99", f"run.dir={tmp_path}"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "moe-train: error" in line]
    assert errors == ["moe-train: error: moe.top_k (99) must be <= moe.num_experts (8)"], proc.stderr[-3000:]
    assert not any(tmp_path.iterdir())
