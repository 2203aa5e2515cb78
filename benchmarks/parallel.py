"""Per-step time of parallel layouts vs the single process on the same global batch, and the bytes each
collective moves per step (per rank, averaged over ranks).

On a CPU box this measures overhead only (gloo over loopback, all ranks sharing the cores): it shows
what each layout costs in communication, not a speed-up.

    python benchmarks/parallel.py --steps 6 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODEL = [
    "model.hidden_size=128",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=32",
    "model.ffn_hidden_size=256",
    "model.vocab_size=1024",
    "moe.num_experts=8",
    "moe.top_k=2",
    "moe.expert_ffn_hidden_size=128",
    "data.mock=true",
    "train.global_batch_size=16",
    "train.micro_batch_size=2",
    "train.seq_len=128",
    "train.eval_every=0",
    "checkpoint.every=0",
    "log.tensorboard=false",
    "log.level=WARNING",
]
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "single": (1, []),
    "dp2": (2, []),
    "dp2_zero1": (2, ["parallel.zero1=true"]),
    "tp2": (2, ["parallel.tp=2"]),
    "ep2": (2, ["parallel.ep=2"]),
    "pp2_1f1b": (2, ["parallel.pp=2"]),
    "tp2_ep2": (4, ["parallel.tp=2", "parallel.ep=2"]),
    "pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved_1f1b"]),
}
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "broadcast",
    "send",
    "recv",
    "batch_isend_irecv",
)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def count_collective_bytes(counter: dict[str, int]) -> None:
    """Wrap torch.distributed collectives so each adds the bytes of its input tensor(s) to `counter`."""
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def wrapped(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            if _name == "batch_isend_irecv":  # P2POp checks its op's identity: count here, not in isend
                tensor = [op.tensor for op in args[0] if op.op is dist.isend]
            else:
                tensor = args[1] if _name in ("all_gather", "reduce_scatter", "all_to_all_single") else args[0]
            counter[_name] += _nbytes(tensor)
            return _original(*args, **kwargs)

        setattr(dist, name, wrapped)


def _worker(rank: int, world: int, port: int, overrides: list[str], run_dir: str, out: Any) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from moe_train.config import load_config
    from moe_train.parallel import build_process_groups
    from moe_train.train.trainer import Trainer

    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    counter: dict[str, int] = defaultdict(int)
    cfg = load_config(None, [*MODEL, *overrides, f"run.dir={run_dir}"])
    trainer = Trainer(cfg, build_process_groups(cfg, world, rank))
    count_collective_bytes(counter)
    records = trainer.fit()
    out.put((rank, [r["step_time_s"] for r in records], dict(counter), records[-1]["loss"]))
    if world > 1:
        dist.destroy_process_group()


def _collect(queue: Any, procs: list[Any], timeout_s: float = 1800.0) -> list[Any]:
    """One result per rank; stop every rank as soon as one dies (instead of waiting forever)."""
    import queue as queue_module
    import time

    results: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=1.0))
        except queue_module.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a rank failed (exit codes {failed}) or the run timed out") from None
    for p in procs:
        p.join()
    return results


def run_layout(world: int, overrides: list[str], steps: int) -> dict[str, Any]:
    """Spawn the layout, return median step time (after 2 warmup steps) and bytes per step per rank."""
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
    times = [t for _, ts, _, _ in results for t in ts[2:]]
    byte_totals: dict[str, float] = defaultdict(float)
    for _, _, counter, _ in results:
        for name, n in counter.items():
            byte_totals[name] += n / world / steps
    return {"step_s": statistics.median(times), "bytes": dict(byte_totals), "loss": results[0][3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = {}
    for name in args.layouts.split(","):
        world, overrides = LAYOUTS[name]
        rows[name] = {"world": world, **run_layout(world, overrides, args.steps)}
    base = rows.get("single", {}).get("step_s")
    lines = [
        "| layout | ranks | step time (s) | vs single | MB moved per rank per step (by collective) |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        ratio = f"{row['step_s'] / base:.2f}x" if base else "-"
        moved = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in sorted(row["bytes"].items())) or "none"
        lines.append(f"| {name} | {row['world']} | {row['step_s']:.3f} | {ratio} | {moved} |")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
