"""Multi-process test harness: spawn `world_size` CPU ranks on a free port and collect their results.

Starting ranks is the expensive part (8 ranks on 2 cores take ~14 s), so a test module should spawn
once and run many checks inside, e.g. with `run_checks` (tests/ is on sys.path under pytest):

    from distributed import run_checks, run_distributed

    CHECKS = [check_groups, check_sums]          # module-level functions (rank, world_size) -> picklable

    @pytest.fixture(scope="module")
    def results():
        return run_distributed(run_checks, 8, CHECKS)   # results[rank][check name]

Worker functions must be importable (defined at module level). A worker exception is re-raised in the
parent as DistributedTestError naming the rank, with the worker's traceback text; a rank that dies
or a run past `timeout` stops every rank instead of hanging.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class DistributedTestError(RuntimeError):
    """A rank of a distributed test failed, died or timed out."""


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_checks(rank: int, world_size: int, checks: Sequence[Callable[[int, int], Any]]) -> dict[str, Any]:
    """Run named checks in order on one rank; returns {check.__name__: its result}."""
    return {check.__name__: check(rank, world_size) for check in checks}


def _set_launch_env(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun would give this rank."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    init: bool,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    torch.set_num_threads(1)
    _set_launch_env(rank, world_size, port)
    try:
        if init:
            dist.init_process_group(
                backend, init_method="env://", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout)
            )
        result = fn(rank, world_size, *args)
        # plain pickle bytes: tensors travel by value, not as shared-memory handles that die with the worker
        results.put((rank, True, pickle.dumps(result)))
        if dist.is_initialized():
            dist.barrier()  # nobody tears down the store (held by rank 0) while others still use it
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    if dist.is_initialized():
        dist.destroy_process_group()
    results.close()
    results.join_thread()  # the result is in the pipe; skip the slow interpreter teardown (seconds)
    os._exit(0)


def _stop(procs: list[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 5.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


def _dead_ranks(procs: list[Any], got: dict[int, Any]) -> str:
    """'rank 1 exit code 3, ...' for ranks that exited with an error before sending a result."""
    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got]
    return ", ".join(f"rank {r} exit code {procs[r].exitcode}" for r in dead)


def _collect(procs: list[Any], results: Any, world_size: int, timeout: float) -> list[Any]:
    """Results in rank order; raises on the first error, a dead rank, or the deadline."""
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(got) < world_size:
        try:
            rank, ok, value = results.get(timeout=0.2)
            value = pickle.loads(value) if ok else value
        except queue.Empty:
            dead = _dead_ranks(procs, got)
            if dead:
                raise DistributedTestError(f"a rank died without a result: {dead}") from None
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(got))
                raise DistributedTestError(f"timed out after {timeout:.0f} s waiting for ranks {missing}") from None
            continue
        if not ok:
            dead = _dead_ranks(procs, got)
            also = f" (died meanwhile: {dead})" if dead else ""
            raise DistributedTestError(f"rank {rank} of {world_size} failed{also}:\n{value}")
        got[rank] = value
    return [got[r] for r in range(world_size)]


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 120.0,
    init: bool = True,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned ranks; return the results in rank order.

    Each rank gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on a free
    port), one torch thread, and, when `init`, an initialized default process group (`backend`, with
    `timeout` on its collectives). `fn`, `args` and the results must be picklable.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = []
    try:
        for rank in range(world_size):
            proc = ctx.Process(
                target=_worker,
                args=(rank, world_size, port, backend, timeout, init, fn, args, results),
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        out = _collect(procs, results, world_size, timeout)
        for proc in procs:
            proc.join(30.0)
        return out
    finally:
        _stop(procs)
