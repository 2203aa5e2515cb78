"""Context parallelism on a long sequence: per-rank activation memory, step time and the bytes of the
cp K/V exchange at cp 1 / 2 / 4.

The demo model (configs/tiny_cpu.yaml: H 256, 4 heads, 2 KV heads, head_dim 64, 8 experts top-2,
vocab 8192) with `--layers` blocks trains one sequence of `--seq-len` tokens per step (mock data),
under cp = 1, 2, 4 (one rank per cp rank, gloo on loopback, one thread each: OpenMP threads stall
badly on an oversubscribed shared machine, and one thread per rank keeps the work per rank comparable).

* activation memory: bytes autograd saves for backward during one step on rank 0 (saved-tensor hooks,
  each storage counted once, parameters excluded): the memory cp divides;
* step time: median of `--steps` steps after one warm-up, rank 0, in `--reps` repetitions whose cp
  order alternates (1,2,4 then 4,2,1); the ratio to cp 1 is taken within each repetition and reported
  as median (range). All ranks share this machine's cores, so on a CPU box this shows overhead, not
  the speed-up of cp ranks on their own GPUs. Also the rank's CPU time per step (`time.process_time`),
  which other sessions' load does not inflate: the compute each rank does (gloo waits included);
* cp exchange: bytes each rank receives in the forward K/V all-gathers (the backward reduce-scatter of
  dK/dV moves as much on NCCL; gloo has no reduce-scatter and all-reduces the full K/V gradient),
  counted from the K/V shards entering the all-gather.

    .venv/bin/python benchmarks/context_parallel.py [--seq-len 8192 --layers 1 --steps 3 --reps 3 --cps 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent


def _overrides(seq_len: int, layers: int, cp: int, run_dir: Path) -> list[str]:
    return [
        f"model.num_layers={layers}",
        "moe.first_k_dense=0",
        "data.mock=true",
        f"train.seq_len={seq_len}",
        "train.global_batch_size=1",
        "train.micro_batch_size=1",
        "train.eval_every=0",
        f"parallel.cp={cp}",
        "checkpoint.every=0",
        "log.tensorboard=false",
        "log.level=WARNING",
        f"run.dir={run_dir}",
    ]


class _SavedBytes:
    """Saved-tensor hooks that add up the distinct storages autograd keeps for backward."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _worker(rank: int, cp: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(cp), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from moe_train.config import load_config
    from moe_train.parallel import context_parallel
    from moe_train.parallel.groups import build_process_groups
    from moe_train.train.trainer import Trainer

    if cp > 1:
        dist.init_process_group("gloo", rank=rank, world_size=cp, timeout=timedelta(minutes=20))
    kv_bytes = [0]
    original = context_parallel.gather_from_sequence

    def counting_gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
        kv_bytes[0] += x.numel() * x.element_size() * (cp - 1)  # received from the other cp ranks
        return original(x, dim, group)

    context_parallel.gather_from_sequence = counting_gather  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs/tiny_cpu.yaml", _overrides(args.seq_len, args.layers, cp, Path(tmp)))
        trainer = Trainer(cfg, build_process_groups(cfg, cp, rank))
        saved = _SavedBytes(trainer.pmodel.parameters())
        times, cpu_times = [], []
        for step in range(args.steps + 1):
            kv_bytes[0] = 0
            start, cpu_start = time.perf_counter(), time.process_time()
            if step == 0:
                with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                    trainer.train_step()
            else:
                trainer.train_step()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            trainer.state.step += 1
            trainer.state.consumed_samples += cfg.train.global_batch_size
    if cp > 1:
        dist.destroy_process_group()
    if rank == 0:
        queue.put(
            {
                "cp": cp,
                "saved_bytes": saved.total,
                "step_s": statistics.median(times[1:]),
                "cpu_s": statistics.median(cpu_times[1:]),
                "kv_bytes": kv_bytes[0],
            }
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cp: int, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, cp, port, args, queue)) for r in range(cp)]
    for p in procs:
        p.start()
    result = queue.get(timeout=3600)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"cp {cp}: a rank exited with {p.exitcode}")
    return dict(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cps", default="1,2,4")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {load[0]:.1f} (shared)")
    print(f"demo model, {args.layers} layer(s), 1 sequence of {args.seq_len} tokens per step, fp32")
    cps = [int(c) for c in args.cps.split(",")]
    runs: dict[int, list[dict[str, Any]]] = {cp: [] for cp in cps}
    for r in range(args.reps):
        for cp in cps if r % 2 == 0 else cps[::-1]:
            runs[cp].append(run(cp, args))
    base = cps[0]
    print(
        f"| cp | ranks | activations saved per rank (MiB) | vs cp {base} | step time (s), median of {args.reps}"
        f" | vs cp {base}: median (range) | rank CPU time per step (s) | vs cp {base}"
        " | K/V all-gather received per rank per step (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for cp in cps:
        saved = runs[cp][0]["saved_bytes"]
        times = [x["step_s"] for x in runs[cp]]
        ratios = sorted(x["step_s"] / b["step_s"] for x, b in zip(runs[cp], runs[base], strict=True))
        cpu = statistics.median(x["cpu_s"] for x in runs[cp])
        cpu_base = statistics.median(x["cpu_s"] for x in runs[base])
        rows.append({"cp": cp, "saved_bytes": saved, "runs": runs[cp]})
        print(
            f"| {cp} | {cp} | {saved / 2**20:.1f} | {saved / runs[base][0]['saved_bytes']:.2f}x"
            f" | {statistics.median(times):.2f} | {statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"
            f" | {cpu:.2f} | {cpu / cpu_base:.2f}x | {runs[cp][0]['kv_bytes'] / 2**20:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
