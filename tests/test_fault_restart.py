"""Faults across ranks, through the real launcher (`torchrun -m moe_train.cli train`, gloo on CPU):

- SIGKILL of rank 2 of 4 mid-run after a checkpoint exists, with `--max-restarts 1`: the job restarts
  from the last complete checkpoint and finishes; its sample ledger, losses and final parameters equal
  the uninterrupted run's (same launcher and layout) exactly. Twin: without a restart the job fails.
- A rank that sleeps inside the gradient-reduction collective: the watchdog of that rank names itself
  and the phase, and the job fails fast (before the sleep ends) instead of hanging.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import TINY

from moe_train.parallel.checkpoint_files import list_checkpoints
from moe_train.parallel.dist_checkpoint import load_canonical_tensors
from moe_train.train.faults import ENV

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
RUN = [*TINY, "train.max_steps=6", "checkpoint.every=2", "checkpoint.resume=auto", "data.ledger=true"]
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="no torchrun")


def _torchrun(nproc: int, restarts: int, args: list[str], faults: str) -> subprocess.CompletedProcess[str]:
    assert TORCHRUN is not None
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), "--max-restarts", str(restarts)]
    env = os.environ | {ENV: faults, "OMP_NUM_THREADS": "1"}
    cmd += ["-m", "moe_train.cli", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_one_rank_restarts_without_losing_samples(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    proc = _torchrun(4, 1, [*RUN, f"run.dir={killed}"], "sigkill,step=4,rank=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "exitcode: -9" in proc.stderr  # the kill did happen (torchrun reports the signal)
    assert "resumed from" in proc.stderr and "step_00000004" in proc.stderr
    reference_dir = tmp_path / "reference"  # the uninterrupted run, same launcher and layout
    proc = _torchrun(4, 0, [*RUN, f"run.dir={reference_dir}"], "")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (killed / "ledger.jsonl").read_text() == (reference_dir / "ledger.jsonl").read_text()
    lines, reference = _metrics(killed), _metrics(reference_dir)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert [line["loss"] for line in lines] == [line["loss"] for line in reference]
    final, want_final = list_checkpoints(killed)[-1], list_checkpoints(reference_dir)[-1]
    assert final.name == want_final.name == "step_00000006"
    got_params, want_params = load_canonical_tensors(final), load_canonical_tensors(want_final)
    assert got_params.keys() == want_params.keys()
    assert all(torch.equal(got_params[name], tensor) for name, tensor in want_params.items())
    twin = _torchrun(4, 0, [*RUN, f"run.dir={tmp_path / 'no_restart'}"], "sigkill,step=4,rank=2")
    assert twin.returncode != 0 and not (tmp_path / "no_restart" / "checkpoints" / "step_00000006").exists()


def test_watchdog_names_the_sleeping_rank_and_phase(tmp_path: Path) -> None:
    sleep_s = 300
    dog = ["train.watchdog.multiple=3", "train.watchdog.floor_s=5", "train.watchdog.warmup_steps=2"]
    args = [*TINY, "train.max_steps=6", "checkpoint.every=0", *dog, "train.watchdog.poll_s=0.2"]
    proc = _torchrun(2, 0, [*args, f"run.dir={tmp_path}"], f"sleep,step=3,rank=1,seconds={sleep_s}")
    assert proc.returncode != 0
    found = re.search(
        r"watchdog: rank 1 stuck in phase 'grad reduce' .* for ([\d.]+) s \(limit ([\d.]+) s", proc.stderr
    )
    assert found is not None, proc.stderr[-4000:]
    elapsed, limit = float(found.group(1)), float(found.group(2))
    assert limit >= 5 and elapsed < sleep_s  # fired while the rank was still asleep
    assert re.search(r"exitcode\s*: 17 ", proc.stderr), proc.stderr[-3000:]  # the watchdog's exit status
