"""CPU calibration of the planner: predicted vs measured step time and peak memory of the demo config
(configs/tiny_cpu.yaml on mock data) at several layouts, on a "cluster" measured on this machine.

Prediction: `moe_train.plan.search.predict` on `measure_cpu_cluster(world_size=ranks)` (fp32 matmul
rate and copy bandwidth measured here, shared by the ranks on the same cores). Measurement: median
step time after 2 warm-up steps (rank 0's metrics), and per rank the peak resident memory minus the
resident memory before the model was built (`ru_maxrss`; it includes allocator slack and autograd
temporaries the model does not list), the largest over ranks.

    python -m benchmarks.plan_calibration --steps 5 [--layouts single,dp2,ep2,tp2,pp2,cp2,dp2_full] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.parallel import _collect

ROOT = Path(__file__).resolve().parent.parent
DEMO = [
    "data.mock=true",
    "train.eval_every=0",
    "checkpoint.every=0",
    "log.tensorboard=false",
    "log.level=WARNING",
]
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "single": (1, []),
    "dp2": (2, []),
    "ep2": (2, ["parallel.ep=2"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2_zero1": (2, ["parallel.zero1=true"]),
    "cp2": (2, ["parallel.cp=2"]),
    "dp2_selective": (2, ["train.recompute=selective"]),
    "dp2_full": (2, ["train.recompute=full"]),
}


def _rss_bytes() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank: int, world: int, port: int, overrides: list[str], run_dir: str, out: Any) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from moe_train.config import load_config
    from moe_train.parallel import build_process_groups
    from moe_train.train.trainer import Trainer

    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=900))
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [*DEMO, *overrides, f"run.dir={run_dir}"])
    before = _rss_bytes()
    records = Trainer(cfg, build_process_groups(cfg, world, rank)).fit()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    out.put((rank, [r["step_time_s"] for r in records], peak))
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, overrides: list[str], steps: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        args = [*overrides, f"train.max_steps={steps}"]
        procs = [ctx.Process(target=_worker, args=(r, world, port, args, tmp, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results = _collect(queue, procs)
    times = [t for rank, ts, _ in results if rank == 0 for t in ts[2:]]
    return {"step_s": statistics.median(times), "peak_bytes": max(peak for _, _, peak in results)}


def predict(world: int, overrides: list[str]) -> dict[str, float]:
    from moe_train.config import load_config
    from moe_train.plan.cluster import measure_cpu_cluster
    from moe_train.plan.search import predict as plan_predict

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [*DEMO, *overrides])
    cand = plan_predict(cfg, world, measure_cpu_cluster(world_size=world))
    assert cand.time is not None
    return {"step_s": cand.time.step, "peak_bytes": cand.memory.total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layouts", default="single,dp2,ep2,tp2,pp2")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = {}
    for name in args.layouts.split(","):
        world, overrides = LAYOUTS[name]
        pred = predict(world, overrides)  # measured right before the run, under the same load
        rows[name] = {"world": world, "predicted": pred, "measured": measure(world, overrides, args.steps)}
    lines = [
        "| layout | ranks | step s predicted | measured | error | peak MB predicted | measured | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        p, m = row["predicted"], row["measured"]
        lines.append(
            f"| {name} | {row['world']} | {p['step_s']:.2f} | {m['step_s']:.2f} | {p['step_s'] / m['step_s'] - 1:+.0%} "
            f"| {p['peak_bytes'] / 1e6:.0f} | {m['peak_bytes'] / 1e6:.0f} | {p['peak_bytes'] / m['peak_bytes'] - 1:+.0%} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
