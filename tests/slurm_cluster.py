"""A throwaway one-node Slurm cluster for tests: Debian's slurmctld + slurmd + munged in a temp dir.

`ensure_slurm()` installs the packages when they are missing (apt-get, as root) and returns None, or the
reason they cannot be had. `SlurmCluster(root)` writes its own munge key and slurm.conf (free ports,
proctrack/linuxproc, task/none, select/cons_tres, no accounting, SlurmUser=root, credentials that
expire after 10 s so that a requeued job restarts after 10 s instead of 2 min), starts the three
daemons in the foreground as children of the test, and `stop()` ends exactly those children. Client
commands run with `cluster.env` (SLURM_CONF exported).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged"]


def _missing() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


def ensure_slurm() -> str | None:
    """None when Slurm and munge are usable (installing them if needed), else why not."""
    if not _missing():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"Slurm binaries {_missing()} missing and not installable here (needs root and apt-get)"
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in (cmd, ["apt-get", "update", "-q"], cmd):  # update only if the first try fails
        proc = subprocess.run(attempt, capture_output=True, text=True, env=env, timeout=600)
        if attempt is cmd and proc.returncode == 0:
            break
    if _missing():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"apt-get install {' '.join(PACKAGES)} failed: {tail[0]}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SLURM_CONF = """\
ClusterName=moetest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket,cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld + slurmd of this machine, configured and owned by this object."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_files(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(
            SLURM_CONF.format(
                host=self.host,
                root=self.root,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                cpus=os.cpu_count() or 1,
            )
        )

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = (self.root / f"{name}.out").open("w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def start(self, timeout: float = 60.0) -> None:
        """Start the daemons and wait until the node is idle."""
        self._write_files()
        r = self.root
        self._spawn(
            ["munged", "-F", "-f", f"--socket={r}/munge.socket", f"--key-file={r}/munge.key",
             f"--pid-file={r}/munged.pid", f"--log-file={r}/munged.log", f"--seed-file={r}/munged.seed"],
            "munged",
        )  # fmt: skip
        self._wait(lambda: (r / "munge.socket").exists(), timeout, "munged socket")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._spawn(["slurmd", "-D", "-f", str(self.conf)], "slurmd")
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", timeout, "an idle node")

    def _wait(self, ready: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Slurm daemon exited while waiting for {what}: {self.logs()}")
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}: {self.logs()}")

    def run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, check=check, timeout=60)

    def job_state(self, job_id: str) -> dict[str, str]:
        """Fields of `scontrol show job` (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_job(self, job_id: str, timeout: float = 600.0, previous_restarts: int = -1) -> dict[str, str]:
        """Wait until the job has ended (a requeued job: until its next run has ended)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            done = state.get("JobState") in (
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
            )
            if done and int(state.get("Restarts", "0")) > previous_restarts:
                return state
            time.sleep(0.5)
        raise RuntimeError(f"job {job_id} did not end in {timeout:.0f} s: {self.job_state(job_id)}")

    def logs(self) -> str:
        tails = []
        for name in ("munged.out", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                tails.append(f"{name}: " + " | ".join(path.read_text().splitlines()[-3:]))
        return "; ".join(tails)

    def stop(self) -> None:
        """End the daemons this object started (and nothing else)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
