"""Dispatch kernel bandwidth: permute (+ FP8 quantise) and unpermute (+ weighted combine), in GB/s.

For every shape (T tokens, H hidden, K top-k, E experts) and dtype, four contenders run the same op on
the same routing, one run:

* ours: moe_train.kernels on the extension (the C++ kernels on CPU, the CUDA kernels on a GPU);
* ref: our pure-PyTorch reference (backend 'torch');
* mcore: Megatron-Core's moe_utils.permute / unpermute (dev extra), given its own routing input (the
  [T, E] routing map and probs its router produces); for the FP8 rows, its permute followed by our
  torch quantiser (Megatron-Core quantises only through Transformer Engine);
* copy: a plain copy of a buffer of (bytes read + bytes written) / 2, i.e. the same memory traffic: the
  ceiling for an op that must read its input and write its output once.

GB/s = that minimal traffic / median time: permute reads T*H and writes R*H elements (R = T*K rows;
FP8 writes R*H bytes plus R*ceil(H/128) fp32 scales); unpermute reads R*H and writes T*H. Timed
repetitions alternate the contenders (rotating which goes first); times are medians. `ours/mcore` and
`ours/copy` are ratios of medians of the same run.

On CPU every contender returns a fresh tensor of up to 2 GiB, and glibc serves allocations above 32 MiB
with a new mmap each time, so page faults (not the op) would dominate every contender except the copy
into a preallocated buffer. The script therefore runs each (shape, dtype) in a child process with
GLIBC_TUNABLES that keep freed memory in the heap (what the CUDA caching allocator does on a GPU);
--fresh-pages measures without. Results go to a JSON-lines file, one line per (shape, dtype), and a
rerun skips the ones already there.

    .venv/bin/python benchmarks/dispatch.py --results d.jsonl # the full grid on CPU, 5 repetitions
    .venv/bin/python benchmarks/dispatch.py --quick           # T=4096, H=1024 only
    .venv/bin/python benchmarks/dispatch.py --device cuda --json dispatch.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moe_train.kernels import permute, quantize_fp8_reference, unpermute
from moe_train.kernels._ext import HAS_CUDA_EXTENSION, HAS_EXTENSION

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.transformer.moe import moe_utils

REUSE_MEMORY = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
GRID = dict(T=(4096, 16384), H=(1024, 4096), K=(2, 8), E=(8, 64))
CONTENDERS = ("ours", "ref", "mcore", "copy")


@dataclass
class Row:
    op: str
    dtype: str
    T: int
    H: int
    K: int
    E: int
    traffic_mb: float
    gbps: dict[str, float]
    ms: dict[str, float]

    def ratio(self, a: str, b: str) -> float:
        return self.gbps[a] / self.gbps[b]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def _inputs(T: int, H: int, K: int, E: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(T * 7 + H + K + E)
    scores_TE = torch.rand(T, E, generator=gen)
    top = scores_TE.topk(K, dim=-1)
    probs_TK = top.values / top.values.sum(-1, keepdim=True)
    routing_map_TE = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top.indices, True)
    probs_TE = torch.zeros(T, E).scatter(1, top.indices, probs_TK)
    x_TH = torch.randn(T, H, generator=gen).to(dtype)
    tensors = dict(x=x_TH, idx=top.indices, probs=probs_TK, map=routing_map_TE, probs_TE=probs_TE)
    return {k: v.to(device) for k, v in tensors.items()}


def _contenders(op: str, t: dict[str, torch.Tensor], traffic: int) -> dict[str, Callable[[], Any]]:
    """The four callables of one op on prepared inputs."""
    E = t["map"].shape[1]
    src = torch.empty(traffic // 2, dtype=torch.uint8, device=t["x"].device)
    dst = torch.empty_like(src)
    if op == "permute":
        ours = lambda: permute(t["x"], t["idx"], E, backend="auto").rows  # noqa: E731
        ref = lambda: permute(t["x"], t["idx"], E, backend="torch").rows  # noqa: E731
        mcore = lambda: moe_utils.permute(t["x"], t["map"])[0]  # noqa: E731
    elif op == "permute_fp8":
        ours = lambda: permute(t["x"], t["idx"], E, fp8=True, backend="auto").rows  # noqa: E731
        ref = lambda: permute(t["x"], t["idx"], E, fp8=True, backend="torch").rows  # noqa: E731
        mcore = lambda: quantize_fp8_reference(moe_utils.permute(t["x"], t["map"])[0])  # noqa: E731
    else:
        rows, sorted_indices = t["rows"], t["sorted_indices"]
        shape = t["x"].shape
        ours = lambda: unpermute(rows, t["row_map"], t["probs"], backend="auto")  # noqa: E731
        ref = lambda: unpermute(rows, t["row_map"], t["probs"], backend="torch")  # noqa: E731
        mcore = lambda: moe_utils.unpermute(rows, sorted_indices, shape, probs=t["probs_TE"], routing_map=t["map"])  # noqa: E731
    return {"ours": ours, "ref": ref, "mcore": mcore, "copy": lambda: dst.copy_(src)}


def _traffic(op: str, T: int, H: int, K: int, elem: int) -> int:
    R = T * K
    if op == "permute":
        return T * H * elem + R * H * elem
    if op == "permute_fp8":
        return T * H * elem + R * H + R * -(-H // 128) * 4
    return R * H * elem + T * H * elem


def measure(op: str, t: dict[str, torch.Tensor], shape: tuple[int, ...], repeats: int, device: torch.device) -> Row:
    T, H, K, E = shape
    dtype = t["x"].dtype
    traffic = _traffic(op, T, H, K, t["x"].element_size())
    fns = _contenders(op, t, traffic)
    for fn in fns.values():  # warmup
        _time(fn, device)
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for rep in range(repeats):
        order = CONTENDERS[rep % 4 :] + CONTENDERS[: rep % 4]
        for name in order:
            times[name].append(_time(fns[name], device))
            gc.collect()
    ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    gbps = {name: traffic / (m / 1e3) / 1e9 for name, m in ms.items()}
    return Row(op, str(dtype).removeprefix("torch."), T, H, K, E, traffic / 1e6, gbps, ms)


def run_shape(shape: tuple[int, int, int, int], dtype: torch.dtype, repeats: int, device: torch.device) -> list[Row]:
    T, H, K, E = shape
    t = _inputs(T, H, K, E, dtype, device)
    rows = [measure("permute", t, shape, repeats, device), measure("permute_fp8", t, shape, repeats, device)]
    permuted = permute(t["x"], t["idx"], E)
    t["rows"], t["row_map"] = permuted.rows, permuted.row_map
    t["sorted_indices"] = moe_utils.permute(t["x"], t["map"])[2]
    rows.append(measure("unpermute", t, shape, repeats, device))
    return rows


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "load_average_start": os.getloadavg(),
    }


def print_table(rows: list[Row]) -> None:
    print(
        "| op | dtype | T | H | K | E | MB moved | ours GB/s | ref GB/s | mcore GB/s | copy GB/s | ours/mcore | ours/copy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = r.gbps
        print(
            f"| {r.op} | {r.dtype} | {r.T} | {r.H} | {r.K} | {r.E} | {r.traffic_mb:,.0f} | {g['ours']:.2f} | "
            f"{g['ref']:.2f} | {g['mcore']:.2f} | {g['copy']:.2f} | {r.ratio('ours', 'mcore'):.2f}x | "
            f"{r.ratio('ours', 'copy'):.0%} |"
        )


def summarize(rows: list[Row]) -> None:
    for op in ("permute", "permute_fp8", "unpermute"):
        sel = [r for r in rows if r.op == op]
        if not sel:
            continue
        vs_mcore = [r.ratio("ours", "mcore") for r in sel]
        vs_copy = [r.ratio("ours", "copy") for r in sel]
        print(
            f"# {op}: ours/mcore median {statistics.median(vs_mcore):.2f}x (range {min(vs_mcore):.2f}-"
            f"{max(vs_mcore):.2f}), ours/copy median {statistics.median(vs_copy):.0%} "
            f"(range {min(vs_copy):.0%}-{max(vs_copy):.0%})"
        )


def _config_key(T: int, H: int, K: int, E: int, dtype: str) -> str:
    return f"{T},{H},{K},{E},{dtype}"


def run_one(args: argparse.Namespace) -> None:
    """Child process: one (shape, dtype), appended to the results file as one JSON line."""
    T, H, K, E, name = args.one.split(",")
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
    rows = run_shape((int(T), int(H), int(K), int(E)), dtype, args.repeats, device)
    line = {"key": args.one, "load_average": os.getloadavg(), "rows": [asdict(r) for r in rows]}
    with open(args.results, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"# done {args.one}: " + ", ".join(f"{r.op} ours/mcore {r.ratio('ours', 'mcore'):.2f}x" for r in rows))


def run_grid(args: argparse.Namespace) -> None:
    """One child per (shape, dtype), so a config's memory is returned before the next; configs already
    in the results file are skipped (resume)."""
    grid = dict(GRID, T=(4096,), H=(1024,)) if args.quick else GRID
    done = set()
    if Path(args.results).exists():
        done = {json.loads(line)["key"] for line in Path(args.results).read_text().splitlines() if line}
    env = dict(os.environ)
    if args.device == "cpu" and not args.fresh_pages:
        env["GLIBC_TUNABLES"] = REUSE_MEMORY
    for T, H, K, E in itertools.product(grid["T"], grid["H"], grid["K"], grid["E"]):
        for name in args.dtypes.split(","):
            key = _config_key(T, H, K, E, name)
            if key in done:
                continue
            cmd = [sys.executable, __file__, "--one", key, "--results", args.results]
            cmd += ["--device", args.device, "--repeats", str(args.repeats)]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            proc = subprocess.run(cmd, env=env)
            if proc.returncode != 0:
                print(f"# FAILED {key} (exit code {proc.returncode})", flush=True)


def report(args: argparse.Namespace, info: dict[str, Any]) -> None:
    lines = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line]
    rows = [Row(**r) for line in lines for r in line["rows"]]
    loads = [line["load_average"][0] for line in lines]
    info["load_average_end"] = os.getloadavg()
    print(
        f"# load average (1 min) over the configs: {min(loads):.1f}-{max(loads):.1f}, median {statistics.median(loads):.1f}"
    )
    print_table(rows)
    summarize(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="only T=4096, H=1024")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--results", default="dispatch_results.jsonl", help="per-config results (resumable)")
    parser.add_argument("--json", help="write all rows and the machine to this file at the end")
    parser.add_argument("--threads", type=int, help="torch / OpenMP threads (default: torch's)")
    parser.add_argument("--fresh-pages", action="store_true", help="CPU: do not keep freed memory (see above)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: "T,H,K,E,dtype"
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    built = HAS_CUDA_EXTENSION if device.type == "cuda" else HAS_EXTENSION
    if not built:
        raise SystemExit(f"the {args.device} extension is not built: 'ours' would be the reference")
    if args.one:
        run_one(args)
        return
    info = machine_info(device)
    info["glibc_tunables"] = None if args.device != "cpu" or args.fresh_pages else REUSE_MEMORY
    print(f"# {json.dumps(info)}", flush=True)
    run_grid(args)
    report(args, info)


if __name__ == "__main__":
    main()
