"""The real Slurm path: Debian's slurmctld, slurmd and munged on this machine, `sbatch launch/slurm.sbatch`.

The module installs the packages when missing (skipped, with the reason, only when that is impossible),
starts a one-node cluster in a temp dir (tests/slurm_cluster.py), submits a tiny 2-rank run (one srun
task running torchrun with a c10d rendezvous on the job's node), waits, checks the checkpoint, the
metrics and the per-job logs, requeues the finished job (the second run resumes from the newest
checkpoint), submits an allocation that does not fit the layout (one line, exit 2) and stops the
daemons it started.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from parity import BASE
from slurm_cluster import SlurmCluster, ensure_slurm

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "launch" / "slurm.sbatch"
STEPS = ["train.max_steps=3", "train.eval_every=0", "checkpoint.every=2", "log.level=INFO"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    reason = ensure_slurm()
    if reason is not None:
        print(f"skipping the Slurm tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


def _submit(cluster: SlurmCluster, work: Path, name: str, args: list[str]) -> str:
    env_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    cmd = ["env", f"PATH={env_path}", "NPROC_PER_NODE=2", f"LOG_ROOT={work / 'logs'}"]
    cmd += ["sbatch", "--parsable", f"--job-name={name}", f"--chdir={work}", f"--output={work}/{name}-%j.out"]
    cmd += ["--cpus-per-task=2", str(SBATCH), *args]
    proc = cluster.run(*cmd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def test_sbatch_trains_checkpoints_and_resumes_when_requeued(cluster: SlurmCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = _submit(cluster, tmp_path, "tiny", [*BASE, *STEPS, f"run.dir={run_dir}"])
    state = cluster.wait_job(job)
    output = (tmp_path / f"tiny-{job}.out").read_text()
    node_log = tmp_path / "logs" / f"tiny-{job}" / "node0.log"
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", output + node_log.read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "step_00000003" / "index.json").is_file()
    assert json.loads((run_dir / "checkpoints" / "step_00000003" / "config.json").read_text())["run"]["dir"] == str(
        run_dir
    )
    log = node_log.read_text()
    assert "world size 2" in log and "step      3/3" in log
    # requeue (as after a preemption or node failure): the second run resumes from the newest checkpoint
    assert cluster.run("scontrol", "requeue", job).returncode == 0
    state = cluster.wait_job(job, previous_restarts=0)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", node_log.read_text()
    assert "run 1:" in (tmp_path / f"tiny-{job}.out").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000003'} at step 3" in node_log.read_text()
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_allocation_that_does_not_fit_the_layout_is_one_line(cluster: SlurmCluster, tmp_path: Path) -> None:
    job = _submit(cluster, tmp_path, "bad", [*BASE, "parallel.tp=4", f"run.dir={tmp_path / 'run'}"])
    state = cluster.wait_job(job)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0"
    lines = (tmp_path / f"bad-{job}.out").read_text().splitlines()
    assert lines == [
        "slurm.sbatch: the allocation (1 node(s) x 2 process(es) = 2 ranks) does not fit: "
        "world size (2) is not divisible by parallel.tp (4) * parallel.pp (1)"
    ]
    assert not (tmp_path / "run").exists()
