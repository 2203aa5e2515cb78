"""ZeRO-1: AdamW whose state (exp_avg, exp_avg_sq) is sharded over each parameter's data-parallel group.

Gradients arrive fully reduced (GradReducer all-reduces them), so every rank of a data-parallel group
holds the same gradient. Each parameter's flat tensor is cut into `size` equal chunks (the last ones
padded, possibly empty); rank i keeps chunk i as a separate fp32 "shard" tensor, runs torch's own AdamW
on its shards, and the updated chunks are all-gathered back into the parameters (one collective per
data-parallel kind). The update is element-wise, so the result equals an unsharded torch AdamW bit for
bit; only the optimizer memory is divided.

The data-parallel group of a parameter is the first of "dp" / "dp_cp" / "edp" in its replicated_kinds:
"dp" for dense parameters ("dp_cp" under context parallelism), "edp" for experts. Sequence-parallel replicated parameters (replicated over
("dp", "tp")) are sharded over "dp" only: every tp rank updates the same chunks identically.

`state_dict()` is in local canonical form — keyed by canonical name, each state tensor shaped like the
local parameter (TP/EP shards stay sharded; ZeRO chunks are gathered) — the same form
`optimizer_local_state` gives for a plain torch AdamW, so checkpoints do not depend on ZeRO.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_train.config import OptimConfig
from moe_train.parallel.data_parallel import NamedParam, ParamsLike, named_params_with_meta
from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.param_meta import get_meta, group_index

STATE_KEYS = ("exp_avg", "exp_avg_sq")
DP_KINDS = ("dp", "dp_cp", "edp")


def zero_kind(replicated_kinds: tuple[str, ...]) -> str | None:
    """The data-parallel kind a parameter's optimizer state is sharded over (None: not sharded)."""
    return next((kind for kind in replicated_kinds if kind in DP_KINDS), None)


@dataclass
class _Slot:
    """One parameter and this rank's chunk of it."""

    name: str
    param: nn.Parameter
    shard: torch.Tensor
    chunk: int
    """Elements per rank (ceil(numel / size)); the segment offset of this parameter is `offset`."""
    offset: int
    lo: int
    hi: int


@dataclass
class _Space:
    """All parameters sharded over one data-parallel kind; one all-gather per step."""

    kind: str
    size: int
    index: int
    slots: list[_Slot]
    segment: int
    """Elements per rank in the gathered buffer (sum of the chunks)."""


def _make_spaces(entries: list[NamedParam], groups: ProcessGroups) -> list[_Space]:
    by_kind: dict[str, list[NamedParam]] = {}
    for entry in entries:
        kind = zero_kind(entry[2].replicated_kinds) or "dp"
        by_kind.setdefault(kind, []).append(entry)
    spaces = []
    for kind, members in by_kind.items():
        size, index = groups.size(kind), group_index(groups, kind)
        slots, offset = [], 0
        for _, param, meta in members:
            chunk = math.ceil(param.numel() / size)
            lo, hi = min(index * chunk, param.numel()), min((index + 1) * chunk, param.numel())
            shard = param.detach().reshape(-1)[lo:hi].clone()
            slots.append(_Slot(meta.canonical_name, param, shard, chunk, offset, lo, hi))
            offset += chunk
        spaces.append(_Space(kind, size, index, slots, offset))
    return spaces


class ZeroAdamW(torch.optim.AdamW):
    """torch AdamW over this rank's chunks of every parameter (ZeRO-1); see the module docstring.

    Weight decay groups as moe_train.train.optim.param_groups: matrices decayed, vectors not.
    `param_groups` holds the shards, so learning-rate setters work unchanged.
    """

    def __init__(self, params: ParamsLike, groups: ProcessGroups, weight_decay: float = 0.0, **adamw: Any) -> None:
        self.groups = groups
        self.spaces = _make_spaces(named_params_with_meta(params), groups)
        slots = [slot for space in self.spaces for slot in space.slots]
        decay = [s.shard for s in slots if s.param.ndim >= 2]
        no_decay = [s.shard for s in slots if s.param.ndim < 2]
        super().__init__(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], **adamw
        )
        self._slot_of = {id(s.shard): s for s in slots}

    def _slots(self) -> list[_Slot]:
        """Slots in param_groups order (the order torch's state_dict numbers parameters)."""
        return [self._slot_of[id(shard)] for group in self.param_groups for shard in group["params"]]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Update this rank's chunks with AdamW, then all-gather the parameters."""
        for space in self.spaces:
            for s in space.slots:
                s.shard.copy_(s.param.detach().reshape(-1)[s.lo : s.hi])
                s.shard.grad = None if s.param.grad is None else s.param.grad.reshape(-1)[s.lo : s.hi]
        loss = super().step(closure)
        for space in self.spaces:
            self._gather(space)
        return loss

    def _gather(self, space: _Space) -> None:
        if space.size == 1:
            for s in space.slots:
                s.param.detach().reshape(-1).copy_(s.shard)
            return
        ref = space.slots[0].shard
        mine = torch.zeros(space.segment, dtype=ref.dtype, device=ref.device)
        for s in space.slots:
            mine[s.offset : s.offset + s.hi - s.lo].copy_(s.shard)
        out = torch.empty(space.size * space.segment, dtype=ref.dtype, device=ref.device)
        dist.all_gather(list(out.chunk(space.size)), mine, group=self.groups.group(space.kind))
        per_rank = out.view(space.size, space.segment)
        for s in space.slots:
            numel = s.param.numel()
            full = per_rank[:, s.offset : s.offset + s.chunk].reshape(-1)[:numel]
            s.param.detach().reshape(-1).copy_(full)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients (and the shards' views of them)."""
        super().zero_grad(set_to_none=True)
        for space in self.spaces:
            for s in space.slots:
                if set_to_none:
                    s.param.grad = None
                elif s.param.grad is not None:
                    s.param.grad.zero_()

    # -- canonical state ----------------------------------------------------------------------

    @torch.no_grad()
    def local_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{canonical name: {step, exp_avg, exp_avg_sq}} with state tensors shaped like the local
        parameter (ZeRO chunks all-gathered: a collective, every rank must call it)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for space in self.spaces:
            gathered = {key: self._gather_state(space, key) for key in STATE_KEYS}
            for s in space.slots:
                state = self.state.get(s.shard, {})
                if "step" in state:
                    full = {key: gathered[key][s.name] for key in STATE_KEYS}
                    out[s.name] = {"step": state["step"].detach().cpu().clone(), **full}
        return out

    def _gather_state(self, space: _Space, key: str) -> dict[str, torch.Tensor]:
        ref = space.slots[0].shard
        mine = torch.zeros(space.segment, dtype=ref.dtype, device=ref.device)
        for s in space.slots:
            state = self.state.get(s.shard, {})
            if key in state:
                mine[s.offset : s.offset + s.hi - s.lo].copy_(state[key])
        if space.size == 1:
            per_rank = mine.view(1, -1)
        else:
            out = torch.empty(space.size * space.segment, dtype=mine.dtype, device=mine.device)
            dist.all_gather(list(out.chunk(space.size)), mine, group=self.groups.group(space.kind))
            per_rank = out.view(space.size, space.segment)
        return {
            s.name: per_rank[:, s.offset : s.offset + s.chunk].reshape(-1)[: s.param.numel()].view_as(s.param).clone()
            for s in space.slots
        }

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Local canonical form: {"state": local_state(), "param_groups": hyperparameters + names}."""
        names = [[self._slot_of[id(p)].name for p in g["params"]] for g in self.param_groups]
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {
            "state": self.local_state(),
            "param_groups": [h | {"params": n} for h, n in zip(hyper, names, strict=True)],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load the local canonical form (from any ZeRO size): each rank keeps its chunk."""
        state = state_dict["state"]
        torch_state: dict[int, dict[str, Any]] = {}
        for i, s in enumerate(self._slots()):
            if s.name in state:
                entry = state[s.name]
                chunks = {key: entry[key].reshape(-1)[s.lo : s.hi].clone() for key in STATE_KEYS}
                torch_state[i] = {"step": entry["step"].clone(), **chunks}
        super().load_state_dict({"state": torch_state, "param_groups": _numbered_groups(self, state_dict)})


def _numbered_groups(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> list[dict[str, Any]]:
    """The optimizer's current param groups in torch's numbered form, hyperparameters from `state_dict`
    when it has matching groups (else the current ones)."""
    saved = state_dict.get("param_groups", [])
    groups, index = [], 0
    for i, group in enumerate(opt.param_groups):
        hyper = {k: v for k, v in group.items() if k != "params"}
        if len(saved) == len(opt.param_groups):
            hyper |= {k: v for k, v in saved[i].items() if k != "params"}
        groups.append(hyper | {"params": list(range(index, index + len(group["params"])))})
        index += len(group["params"])
    return groups


# -- either optimizer, one state form ----------------------------------------------------------


def optimizer_local_state(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Local canonical optimizer state of a ZeroAdamW or a plain torch AdamW over metadata-carrying
    parameters: {canonical name: {step, exp_avg, exp_avg_sq}}, tensors shaped like the local parameter.
    Any other optimizer that has `local_state()` (e.g. the DeepSpeed engine's) provides this form itself.
    For a plain AdamW the moments are the optimizer's own tensors (read them before the next step)."""
    if isinstance(optimizer, ZeroAdamW) or hasattr(optimizer, "local_state"):
        return optimizer.local_state()  # type: ignore[no-any-return]
    out = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "exp_avg" in state:
                name = _name(param)
                raw_step = state.get("step", group.get("step"))  # apex FusedAdam keeps step per group
                if raw_step is None:
                    raise ValueError(f"optimizer state of {name} has moments but no step count")
                step = torch.as_tensor(raw_step, dtype=torch.float32).detach().cpu().clone()
                # the moments themselves, not copies: a save writes them at once (a copy would cost a
                # rank twice its Adam state at every checkpoint)
                out[name] = {"step": step, **{key: state[key].detach() for key in STATE_KEYS}}
    return out


def _name(param: torch.Tensor) -> str:
    meta = get_meta(param)
    if meta is None:
        raise ValueError(f"optimizer parameter of shape {list(param.shape)} has no ParamMeta (call ensure_meta first)")
    return meta.canonical_name


def load_optimizer_local_state(optimizer: torch.optim.Optimizer, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Inverse of optimizer_local_state; hyperparameters stay those of `optimizer`."""
    if isinstance(optimizer, ZeroAdamW):
        optimizer.load_state_dict({"state": state})
        return
    if hasattr(optimizer, "load_local_state"):
        optimizer.load_local_state(state)
        return
    torch_state: dict[int, dict[str, Any]] = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, param in enumerate(params):
        name = _name(param)
        if name in state:
            torch_state[i] = {k: v.clone() for k, v in state[name].items()}
    optimizer.load_state_dict({"state": torch_state, "param_groups": _numbered_groups(optimizer, {})})


def adamw_kernel(optim: OptimConfig, params: Sequence[torch.Tensor]) -> dict[str, bool]:
    """torch AdamW's implementation switch: {'fused': True} with optim.fused when every parameter is on a
    device torch's fused AdamW serves (CPU, CUDA), else {'foreach': optim.foreach}."""
    if optim.fused and all(p.device.type in ("cpu", "cuda") for p in params):
        return {"fused": True}
    return {"foreach": optim.foreach}


def build_zero_optimizer(model: ParamsLike, optim: OptimConfig, groups: ProcessGroups) -> ZeroAdamW:
    """ZeroAdamW with the hyperparameters and the kernel choice of moe_train.train.optim.build_optimizer
    (torch fused with optim.fused, else foreach unless optim.foreach is false)."""
    entries = named_params_with_meta(model)
    kernel = adamw_kernel(optim, [p for _, p, _ in entries])
    return ZeroAdamW(
        [(name, p) for name, p, _ in entries],
        groups,
        weight_decay=optim.weight_decay,
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        **kernel,
    )
