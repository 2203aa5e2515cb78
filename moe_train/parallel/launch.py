"""Process start-up: read the torchrun environment, pick the backend, initialize torch.distributed.

torchrun (and `srun ... torchrun` on Slurm) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT. Without WORLD_SIZE (or with WORLD_SIZE=1) the run is a single process and nothing is
initialized.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_train.config import Config, ConfigError
from moe_train.parallel.groups import ProcessGroups, build_process_groups
from moe_train.parallel.layout import validate_layout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun tells this process."""

    rank: int
    world_size: int
    local_rank: int


def _env_int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {key} ({raw!r}) must be an integer") from None


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK from the environment (defaults: a single process)."""
    env = os.environ if env is None else env
    launch = LaunchEnv(
        rank=_env_int(env, "RANK", 0),
        world_size=_env_int(env, "WORLD_SIZE", 1),
        local_rank=_env_int(env, "LOCAL_RANK", 0),
    )
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise ConfigError(f"environment RANK ({launch.rank}) must be in [0, WORLD_SIZE ({launch.world_size}))")
    if launch.world_size > 1:
        missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if not env.get(key)]
        if missing:
            raise ConfigError(f"environment {', '.join(missing)} unset with WORLD_SIZE ({launch.world_size}) > 1")
    return launch


def resolve_backend(name: str) -> str:
    """'auto' -> 'nccl' when CUDA is available, else 'gloo'; 'nccl' without CUDA is an error."""
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if name not in ("nccl", "gloo"):
        raise ConfigError(f"parallel.backend ({name!r}) must be one of auto, nccl, gloo")
    if name == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend ('nccl') needs CUDA, which is not available; use 'gloo' or 'auto'")
    return name


def init_distributed(cfg: Config, env: Mapping[str, str] | None = None) -> ProcessGroups:
    """Initialize torch.distributed from the torchrun environment and build this rank's ProcessGroups.

    The layout is validated before any process group exists. An already initialized default group
    (e.g. from a test harness) is reused. For nccl the CUDA device is set from LOCAL_RANK first.
    """
    launch = read_launch_env(env)
    if launch.world_size == 1 and not dist.is_initialized():
        validate_layout(cfg, 1)
        return ProcessGroups.single()
    backend = resolve_backend(cfg.parallel.backend)
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(launch.local_rank)
        validate_layout(cfg, launch.world_size)  # fail before paying for the rendezvous
        timeout = timedelta(seconds=cfg.parallel.collective_timeout_s)
        store = _restart_safe_store(launch, timeout)
        init = {"store": store} if store is not None else {"init_method": "env://"}
        dist.init_process_group(
            backend=backend, rank=launch.rank, world_size=launch.world_size, timeout=timeout, **init
        )
        logger.info("torch.distributed initialized: backend %s, world size %d", backend, launch.world_size)
    return build_process_groups(cfg, dist.get_world_size(), dist.get_rank())


def _restart_safe_store(launch: LaunchEnv, timeout: timedelta) -> dist.Store | None:
    """Under torchrun's agent store: a client of it with a per-attempt key prefix, else None (env://).

    The agent keeps one store across `--max-restarts` attempts; without a prefix the restarted ranks read
    the dead ranks' gloo addresses of the previous attempt and fail to connect."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), launch.world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"moe_train/attempt_{attempt}", client)


def destroy_distributed(wait_for_all: bool = False) -> None:
    """Tear down torch.distributed if it was initialized (safe to call twice). `wait_for_all` (a run that
    ended normally): a barrier first, so no rank tears its groups down while another still uses them."""
    if dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()
