"""launch/torchrun.sh, launch/deepspeed.sh and launch/slurm.sbatch: --help, --dry-run, bad input, and real
runs of the first two (the Slurm run is tests/test_slurm.py).

The torchrun.sh run also checks the console contract: rank 0 logs progress (and draws the progress bar),
other ranks log only warnings and errors, prefixed by their rank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import free_port
from parity import BASE

from moe_train.config import load_config
from moe_train.train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, env=env or ENV, cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "slurm.sbatch"])
def test_help(script: str) -> None:
    proc = _run(str(LAUNCH / script), "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert "moe-train train" in proc.stdout and "--dry-run" in proc.stdout


def test_torchrun_dry_run_multi_node() -> None:
    args = ["--nnodes", "2", "--nproc-per-node", "4", "--rdzv-endpoint", "node0:29400", "--dry-run", "--"]
    proc = _run(str(LAUNCH / "torchrun.sh"), *args, *BASE, "parallel.ep=8", "train.global_batch_size=16")
    assert proc.returncode == 0, proc.stderr
    first, report = proc.stdout.split("\n", 1)
    assert first == (
        "torchrun --nproc-per-node 4 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint node0:29400 --rdzv-id moe-train "
        f"-m moe_train.cli train {' '.join(BASE)} parallel.ep=8 train.global_batch_size=16"
    )
    assert report.startswith("world 8:")


def test_deepspeed_and_slurm_dry_runs(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=4\nnode-b slots=4  # the second\n")
    batch = "train.global_batch_size=16"
    proc = _run(str(LAUNCH / "deepspeed.sh"), "--hostfile", str(hostfile), "--dry-run", "--", *BASE, batch)
    assert proc.returncode == 0, proc.stderr
    first, report = proc.stdout.split("\n", 1)
    assert first.startswith(f"deepspeed --hostfile {hostfile} --master_addr node-a --master_port 29500 --module")
    assert "--no_ssh_check" not in first and report.startswith("world 8:")
    env = {**ENV, "NNODES": "2", "NPROC_PER_NODE": "4", "HEAD_NODE": "node0"}
    proc = _run(str(LAUNCH / "slurm.sbatch"), "--dry-run", *BASE, batch, env=env)
    assert proc.returncode == 0, proc.stderr
    first, report = proc.stdout.split("\n", 1)
    assert first.startswith("srun --ntasks=2 --ntasks-per-node=1 torchrun --nnodes 2 --nproc-per-node 4")
    assert "--rdzv-backend c10d --rdzv-endpoint node0:29500" in first and report.startswith("world 8:")


BAD = [
    (["deepspeed.sh", "--hostfile", "{tmp}/missing", "--", "data.mock=true"], "deepspeed.sh: hostfile {tmp}/missing does not exist"),
    (["deepspeed.sh", "--hostfile", "{tmp}/bad_hostfile"], "deepspeed.sh: hostfile {tmp}/bad_hostfile line 2 ('node-b 4') must look like 'HOST slots=N'"),
    (["deepspeed.sh", "--", "data.mock=true"], "deepspeed.sh: --hostfile FILE is required (lines 'HOST slots=N')"),
    (["torchrun.sh", "--nnodes", "2", "--", "data.mock=true"], "torchrun.sh: --nnodes 2 needs --rdzv-endpoint HOST:PORT (the first node)"),
    (["torchrun.sh", "data.mock=true"], "torchrun.sh: unknown option 'data.mock=true' (moe-train arguments go after --; see --help)"),
    (["torchrun.sh", "--nproc-per-node", "2", "--", "data.mock=true", "parallel.tp=4"], "moe-train: error: world size (2) is not divisible by parallel.tp (4) * parallel.pp (1)"),
    (["slurm.sbatch", "data.mock=true"], "slurm.sbatch: not inside a Slurm job: submit with sbatch (or use --dry-run / --help)"),
]  # fmt: skip


@pytest.mark.parametrize("args,message", BAD, ids=[f"{b[0][0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "bad_hostfile").write_text("node-a slots=2\nnode-b 4\n")
    script, *rest = args
    proc = _run(str(LAUNCH / script), *(a.format(tmp=tmp_path) for a in rest))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [message.format(tmp=tmp_path)] and proc.stdout == ""


def test_torchrun_sh_two_nodes_rank_prefixed_warnings_and_one_progress_bar(tmp_path: Path) -> None:
    """Two torchrun agents ("nodes", one process each) meet at a c10d rendezvous; pp2 with one
    micro-batch per step makes the layout check warn on every rank. (The single-node --standalone
    command is run for real by tests/test_launch.py.)"""
    overrides = [*BASE, "parallel.pp=2", "train.global_batch_size=2", "train.max_steps=2", "train.eval_every=0"]
    overrides += ["log.level=INFO", "log.progress_bar=always", "train.log_every=1", f"run.dir={tmp_path / 'run'}"]
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "t"]
    cmd = ["bash", str(LAUNCH / "torchrun.sh"), *node, "--", *overrides]
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)]
    agents.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO))
    outputs = [agent.communicate(timeout=600) for agent in agents]
    stderr = "\n".join(err for _, err in outputs)
    assert [agent.returncode for agent in agents] == [0, 0], stderr[-3000:]
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    lines = stderr.replace("\r", "\n").splitlines()
    warning = "WARNING micro-batches per step (1) < parallel.pp (2)"
    assert any(warning in line and "[rank1] " in line for line in lines)
    assert any(warning in line and "[rank" not in line for line in lines)  # rank 0: no prefix
    assert not any("[rank1] INFO" in line for line in lines)  # other ranks: warnings and errors only
    assert sum("INFO step      2/2" in line for line in lines) == 1
    # one bar, rank 0's: each bar draws its empty state once, when it is created (later redraws show steps)
    assert sum(line.startswith("train   0%|") and " 0/2 [" in line for line in lines) == 1
    assert any(line.startswith("train 100%|") and " 2/2 [" in line and "ETA 0:00:00" in line for line in lines)


@pytest.mark.skipif(shutil.which("deepspeed", path=ENV["PATH"]) is None, reason="DeepSpeed is not installed")
def test_deepspeed_sh_real_launcher_with_hostfile(tmp_path: Path) -> None:
    """The real deepspeed launcher (one-host hostfile: local launch) starts 2 ranks that read its environment
    and --local_rank; with the DeepSpeed engine (ZeRO-1, ep2) the losses equal one native process."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    steps = ["train.max_steps=2", "train.eval_every=0"]
    ds = ["engine.name=deepspeed", "engine.deepspeed_config={zero_optimization: {stage: 1}}", "parallel.ep=2"]
    args = ["--hostfile", str(hostfile), "--master-port", str(free_port()), "--"]
    proc = _run(str(LAUNCH / "deepspeed.sh"), *args, *BASE, *steps, *ds, f"run.dir={tmp_path / 'ds'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "ds" / "metrics.jsonl").read_text().splitlines()]
    reference = Trainer(load_config(None, [*BASE, *steps, f"run.dir={tmp_path / 'native'}"])).fit()
    for got, want in zip(lines, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5, abs=1e-6)


def test_local_rank_argument(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The deepspeed launcher's --local_rank (before the subcommand) sets LOCAL_RANK, and must agree with it."""
    from moe_train.cli import main

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main(["--local_rank=0", "inspect"]) == 0
    assert os.environ["LOCAL_RANK"] == "0"
    monkeypatch.setenv("LOCAL_RANK", "1")
    capsys.readouterr()
    assert main(["--local_rank=0", "inspect"]) == 2
    assert (
        capsys.readouterr().err == "moe-train: error: --local_rank (0) differs from the environment's LOCAL_RANK (1)\n"
    )
