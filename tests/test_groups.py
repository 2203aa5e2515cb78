"""Rank layout (pure), and real gloo process groups: one spawn at world 8, one at world 4."""

from __future__ import annotations

import os

import pytest
import torch
from distributed import DistributedTestError, run_checks, run_distributed  # tests/distributed.py

from moe_train.config import Config, ConfigError, ParallelConfig
from moe_train.parallel import (
    GROUP_KINDS,
    Layout,
    ProcessGroups,
    build_process_groups,
    destroy_distributed,
    init_distributed,
    rank_layout,
    read_launch_env,
    resolve_backend,
)

# name -> parallel settings; every one valid with _config() at its world size
LAYOUTS_8: dict[str, dict[str, object]] = {
    "tp2_ep4": {"tp": 2, "ep": 4},
    "pp2_tp2_ep2": {"pp": 2, "tp": 2, "ep": 2},
    "tp2_ep2_etp2": {"tp": 2, "ep": 2, "etp": 2},
    "ep8": {"ep": 8},
    "pp2_vpp2_ep4": {"pp": 2, "vpp": 2, "ep": 4, "pp_schedule": "interleaved_1f1b"},
}
LAYOUTS_4: dict[str, dict[str, object]] = {
    "tp2_ep4": {"tp": 2, "ep": 4},
    "pp2_ep2": {"pp": 2, "ep": 2},
    "tp2_etp2": {"tp": 2, "etp": 2},
    "dp4": {},
}


def _config(**parallel: object) -> Config:
    cfg = Config()
    cfg.parallel = ParallelConfig(**parallel)  # type: ignore[arg-type]
    cfg.train.micro_batch_size = 1
    return cfg


def _layout(world_size: int, **parallel: object) -> Layout:
    return rank_layout(world_size, _config(**parallel).parallel)


# ---------------------------------------------------------------------------------------------
# Pure layout


@pytest.mark.parametrize(
    ("world", "parallel"),
    [(8, p) for p in LAYOUTS_8.values()]
    + [(4, p) for p in LAYOUTS_4.values()]
    + [(1024, {"tp": 8, "pp": 4, "ep": 16})],
)
def test_every_kind_partitions_the_world(world: int, parallel: dict[str, object]) -> None:
    layout = _layout(world, **parallel)
    for kind in GROUP_KINDS:
        flat = sorted(r for g in layout.groups[kind] for r in g)
        assert flat == list(range(world)), kind
        if kind != "embedding":  # pairs of first/last-stage ranks, middle stages alone
            assert len({len(g) for g in layout.groups[kind]}) == 1, f"{kind} groups differ in size"


def test_folded_tp2_ep4_on_8_ranks() -> None:
    layout = _layout(8, tp=2, ep=4)
    assert (layout.dp, layout.edp) == (4, 2)
    g = layout.groups
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert g["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["etp"] == [[r] for r in range(8)]
    ep0 = set(g["ep"][0])
    assert {0, 1} <= ep0, "an EP group spans a TP group"
    assert len({layout.coords(r).dp_rank for r in ep0}) == 2, "an EP group spans attention-DP ranks"
    assert g["lbl"] == g["stage"] == [list(range(8))]


def test_sizes_and_coords_match_groups() -> None:
    layout = _layout(16, pp=2, tp=2, ep=2, etp=2)
    assert (layout.dp, layout.edp) == (4, 2)
    sizes = {"tp": 2, "pp": 2, "dp": 4, "ep": 2, "etp": 2, "edp": 2, "stage": 8, "embedding": 2}
    for kind, size in sizes.items():
        assert all(len(g) == size for g in layout.groups[kind]), kind
    for rank in range(16):
        c = layout.coords(rank)
        assert layout.group_of("tp", rank).index(rank) == c.tp_rank
        assert layout.group_of("dp", rank).index(rank) == c.dp_rank
        assert layout.group_of("pp", rank).index(rank) == c.pp_rank
        assert layout.group_of("ep", rank).index(rank) == c.ep_rank
        assert layout.group_of("etp", rank).index(rank) == c.etp_rank
        assert layout.group_of("edp", rank).index(rank) == c.edp_rank
    assert layout.groups["pp"][0] == [0, 8]
    assert layout.groups["embedding"][3] == [3, 11]


def test_layout_rejects_indivisible_world() -> None:
    with pytest.raises(
        ConfigError, match=r"world size \(6\) is not divisible by parallel.etp \(1\) \* parallel.ep \(4\)"
    ):
        _layout(6, ep=4)


# ---------------------------------------------------------------------------------------------
# Single process and launch (no spawn)


def test_single_process_groups_are_no_ops() -> None:
    pg = ProcessGroups.single()
    assert pg.group("ep") is None and pg.size("lbl") == 1 and pg.is_first_stage and pg.is_last_stage
    x = torch.arange(3.0)
    assert pg.all_reduce(x, "dp") is x and x.tolist() == [0.0, 1.0, 2.0]
    assert pg.pp_neighbour(1) is None
    assert build_process_groups(Config(), 1, 0) == ProcessGroups.single()
    assert init_distributed(Config(), env={}).world_size == 1
    with pytest.raises(KeyError, match="unknown group kind 'moe'"):
        pg.group("moe")


def test_launch_env_and_backend() -> None:
    assert read_launch_env({}).world_size == 1
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (3, 8, 1)
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        read_launch_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    with pytest.raises(ConfigError, match=r"RANK \(2\) must be in \[0, WORLD_SIZE \(2\)\)"):
        read_launch_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    expected = "nccl" if torch.cuda.is_available() else "gloo"
    assert resolve_backend("auto") == expected and resolve_backend("gloo") == "gloo"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="parallel.backend"):
            resolve_backend("nccl")
    cfg = _config(tp=2)
    with pytest.raises(ConfigError, match=r"world size \(1\)"):
        init_distributed(cfg, env={})


# ---------------------------------------------------------------------------------------------
# Real groups (workers: module-level so spawn can import them)


def _probe_groups(rank: int, world_size: int, pg: ProcessGroups) -> dict[str, object]:
    """All-reduce a one-hot vector (-> exact members) and the rank (-> sum) over every group kind."""
    members, sums = {}, {}
    for kind in GROUP_KINDS:
        onehot = torch.zeros(world_size)
        onehot[rank] = 1.0
        members[kind] = pg.all_reduce(onehot, kind).nonzero().flatten().tolist()
        sums[kind] = int(pg.all_reduce(torch.tensor([float(rank)]), kind).item())
    coords = {k: getattr(pg, k) for k in ("tp_rank", "pp_rank", "dp_rank", "ep_rank", "etp_rank", "edp_rank")}
    return {"members": members, "sums": sums, "coords": coords, "ranks": pg.ranks}


def _probe_layouts(rank: int, world_size: int, layouts: dict[str, dict[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, parallel in layouts.items():
        out[name] = _probe_groups(rank, world_size, build_process_groups(_config(**parallel), world_size, rank))
    return out


def check_layouts_8(rank: int, world_size: int) -> dict[str, object]:
    return _probe_layouts(rank, world_size, LAYOUTS_8)


def check_init_from_env_4(rank: int, world_size: int) -> dict[str, object]:
    """No harness init: init_distributed reads the torchrun variables, then probe every layout."""
    assert os.environ["WORLD_SIZE"] == "4"
    pg = init_distributed(_config(tp=2, ep=4))
    out: dict[str, object] = {"init": _probe_groups(rank, world_size, pg)}
    out.update(_probe_layouts(rank, world_size, LAYOUTS_4))
    destroy_distributed()
    return out


def _assert_probes(results: list[dict[str, object]], world: int, layouts: dict[str, dict[str, object]]) -> None:
    for name, parallel in layouts.items():
        layout = _layout(world, **parallel)
        for rank, per_rank in enumerate(results):
            probe = per_rank[name]
            assert isinstance(probe, dict)
            for kind in GROUP_KINDS:
                expected = layout.group_of(kind, rank)
                assert probe["members"][kind] == expected, (name, kind, rank)
                assert probe["sums"][kind] == sum(expected), (name, kind, rank)
                assert probe["ranks"][kind] == expected
            c = layout.coords(rank)
            assert probe["coords"] == {k: getattr(c, k) for k in probe["coords"]}


@pytest.fixture(scope="module")
def results_8() -> list[dict[str, object]]:
    return [r["check_layouts_8"] for r in run_distributed(run_checks, 8, [check_layouts_8])]


def test_groups_world_8(results_8: list[dict[str, object]]) -> None:
    _assert_probes(results_8, 8, LAYOUTS_8)


def test_folded_groups_world_8_ep_spans_tp(results_8: list[dict[str, object]]) -> None:
    probe = results_8[0]["tp2_ep4"]
    assert isinstance(probe, dict)
    assert probe["members"]["ep"] == [0, 1, 2, 3] and probe["members"]["tp"] == [0, 1]


def test_groups_world_4_from_env() -> None:
    results = run_distributed(check_init_from_env_4, 4, init=False)
    _assert_probes(results, 4, {"init": {"tp": 2, "ep": 4}, **LAYOUTS_4})


# ---------------------------------------------------------------------------------------------
# The harness itself


def _raise_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on purpose")
    torch.distributed.barrier()  # rank 0 would wait forever without the harness stopping it


def _die_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(3)
    torch.distributed.all_reduce(torch.ones(1))


def test_harness_reraises_worker_exception() -> None:
    with pytest.raises(DistributedTestError, match=r"(?s)rank 1 of 2 failed.*ValueError: boom on purpose"):
        run_distributed(_raise_on_rank_1, 2, timeout=60)


def test_harness_does_not_hang_when_a_rank_dies() -> None:
    with pytest.raises(DistributedTestError, match="rank 1 exit code 3"):
        run_distributed(_die_on_rank_1, 2, timeout=60)
