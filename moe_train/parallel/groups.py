"""ProcessGroups: every torch.distributed group a rank takes part in, passed explicitly (no globals).

`build_process_groups` derives the layout (moe_train.parallel.layout), then calls
`torch.distributed.new_group` for every group of every kind in one fixed order, on every rank, as
torch requires. Groups with the same members (dp_cp == dp, lbl == stage, mixture == grad_norm == world)
share one communicator. `ProcessGroups.single()` is the one-process instance: no groups, sizes 1, and
collective helpers that return their input, so single-device code needs no special cases.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_train.config import Config
from moe_train.parallel.layout import GROUP_KINDS, Layout, validate_layout

logger = logging.getLogger(__name__)

Group = dist.ProcessGroup | None


@dataclass
class ProcessGroups:
    """This rank's process groups, its coordinates and the sizes of every parallel dimension.

    Group fields are None in a single process. See layout.GROUP_KINDS for what each kind is for.
    """

    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    cp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    etp_rank: int = 0
    edp_rank: int = 0
    tp_size: int = 1
    cp_size: int = 1
    pp_size: int = 1
    vpp_size: int = 1
    dp_size: int = 1
    ep_size: int = 1
    etp_size: int = 1
    edp_size: int = 1
    tp: Group = None
    cp: Group = None
    """Context parallel: the ranks holding the other chunks of this rank's sequences (K/V all-gather)."""
    tp_cp: Group = None
    """Tensor x context parallel: every token shard of one micro-batch (router statistics)."""
    pp: Group = None
    dp: Group = None
    dp_cp: Group = None
    """Data x context parallel: dense gradients are summed here."""
    ep: Group = None
    etp: Group = None
    edp: Group = None
    stage: Group = None
    """All ranks of this pipeline stage (tp x cp x dp = edp x ep x etp)."""
    lbl: Group = None
    """Global-batch load-balancing loss: sum per-expert token counts here (the stage group)."""
    mixture: Group = None
    """Per-domain losses for the mixture sampler (the world; only last-stage tp_rank 0 contributes)."""
    grad_norm: Group = None
    """Global gradient norm (the world)."""
    embedding: Group = None
    """First and last stage, for tied embeddings under pp > 1."""
    ranks: dict[str, list[int]] = field(default_factory=lambda: {kind: [0] for kind in GROUP_KINDS})
    """Global ranks of this rank's group of each kind (e.g. pipeline neighbours for send/recv)."""

    @classmethod
    def single(cls) -> ProcessGroups:
        """One process, no torch.distributed: every group None, every size 1."""
        return cls()

    @property
    def is_first_stage(self) -> bool:
        """This rank holds pipeline stage 0 (the embedding)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """This rank holds the last pipeline stage (head and loss)."""
        return self.pp_rank == self.pp_size - 1

    @property
    def contributes_domain_loss(self) -> bool:
        """Whether this rank's per-domain losses enter the 'mixture' all-reduce (once per DP replica:
        the tp and cp ranks of a replica hold the same full-sequence token losses)."""
        return self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0

    def group(self, kind: str) -> Group:
        """The group of a kind by name (see GROUP_KINDS)."""
        if kind not in GROUP_KINDS:
            raise KeyError(f"unknown group kind '{kind}' (known: {', '.join(GROUP_KINDS)})")
        group: Group = getattr(self, kind)
        return group

    def size(self, kind: str) -> int:
        """Number of ranks in this rank's group of `kind`."""
        return len(self.ranks[kind])

    def pp_neighbour(self, offset: int) -> int | None:
        """Global rank of the pipeline stage `offset` away (-1 previous, +1 next); None past the ends."""
        index = self.pp_rank + offset
        return self.ranks["pp"][index] if 0 <= index < self.pp_size else None

    def all_reduce(
        self, tensor: torch.Tensor, kind: str, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
    ) -> torch.Tensor:
        """In-place all-reduce over this rank's `kind` group; a no-op for a group of one rank."""
        group = self.group(kind)
        if self.size(kind) > 1:
            dist.all_reduce(tensor, op=op, group=group)
        return tensor

    def describe(self) -> str:
        """One line: rank and coordinates, for logs."""
        return (
            f"rank {self.rank}/{self.world_size}: pp {self.pp_rank}/{self.pp_size} dp {self.dp_rank}/{self.dp_size}"
            f" cp {self.cp_rank}/{self.cp_size} tp {self.tp_rank}/{self.tp_size} | edp {self.edp_rank}/{self.edp_size}"
            f" ep {self.ep_rank}/{self.ep_size} etp {self.etp_rank}/{self.etp_size}"
        )


def _new_groups(layout: Layout, rank: int, timeout: timedelta | None = None) -> dict[str, Group]:
    """Create every group (same calls, same order on all ranks); return this rank's group per kind."""
    world = list(range(layout.world_size))
    created: dict[tuple[int, ...], Group] = {tuple(world): dist.group.WORLD}
    mine: dict[str, Group] = {}
    for kind in GROUP_KINDS:
        for ranks in layout.groups[kind]:
            key = tuple(ranks)
            if key not in created:
                created[key] = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[kind] = created[key]
    return mine


def groups_from_layout(layout: Layout, rank: int, timeout: timedelta | None = None) -> ProcessGroups:
    """ProcessGroups of `rank` under `layout`; torch.distributed must be initialized with its world size.
    `timeout`: of every collective on the new groups (None: the backend's default)."""
    if not dist.is_initialized():
        raise RuntimeError(f"torch.distributed is not initialized (world size {layout.world_size} needs it)")
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(
            f"world size of the layout ({layout.world_size}) != torch.distributed world size ({dist.get_world_size()})"
        )
    c = layout.coords(rank)
    groups = ProcessGroups(
        rank=rank,
        world_size=layout.world_size,
        tp_rank=c.tp_rank,
        cp_rank=c.cp_rank,
        pp_rank=c.pp_rank,
        dp_rank=c.dp_rank,
        ep_rank=c.ep_rank,
        etp_rank=c.etp_rank,
        edp_rank=c.edp_rank,
        tp_size=layout.tp,
        cp_size=layout.cp,
        pp_size=layout.pp,
        vpp_size=layout.vpp,
        dp_size=layout.dp,
        ep_size=layout.ep,
        etp_size=layout.etp,
        edp_size=layout.edp,
        ranks={kind: layout.group_of(kind, rank) for kind in GROUP_KINDS},
    )
    for kind, group in _new_groups(layout, rank, timeout).items():
        setattr(groups, kind, group)
    return groups


def build_process_groups(cfg: Config, world_size: int, rank: int) -> ProcessGroups:
    """Validate the layout of `cfg` on `world_size` ranks and create this rank's groups.

    A world of one without torch.distributed initialized gives ProcessGroups.single().
    """
    layout = validate_layout(cfg, world_size)
    if world_size == 1 and not dist.is_initialized():
        return ProcessGroups.single()
    groups = groups_from_layout(layout, rank, timedelta(seconds=cfg.parallel.collective_timeout_s))
    logger.info("process groups built: %s", groups.describe())
    return groups
