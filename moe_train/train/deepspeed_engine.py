"""`engine.name: deepspeed`: the optimizer step through `deepspeed.initialize` (ZeRO stage 1/2, optional
optimizer CPU offload) on data x expert parallel layouts.

What DeepSpeed does, and what stays moe_train's:

* The model is ours, sharded by moe_train.parallel (expert parallel: our dispatcher's all-to-all over
  `groups.ep`); there is no GradReducer. DeepSpeed reduces the gradients: dense ones over the world,
  expert ones over its expert-data-parallel group `ep_size_<ep>`, both divided by the world size, which
  is moe_train's rule (moe_train.parallel.param_meta) for tp = pp = 1.
* Expert parameters carry DeepSpeed's markers (`allreduce = False`, `group_name = "ep_size_<ep>"`) and
  sit in optimizer param groups with `moe: True`. DeepSpeed recognises an MoE model only by the type of
  its own MoE layer, so the model is wrapped together with `ExpertGroups`, a parameter-free module of
  that type whose only job is to create DeepSpeed's expert groups, checked equal to ours.
* The optimizer is ours (torch AdamW over optim.*, decay on matrices only); ZeRO partitions its state.
  Clipping is DeepSpeed's (`gradient_clipping` = optim.grad_clip; the same factor max / (norm + 1e-6)),
  the learning rate comes from optim.schedule, set before every step.
* Every micro-batch runs `engine.backward(loss)` (the loss is already scaled by 1/M, so no further
  scaling) and `engine.step()`; the last one of the step reduces, clips and updates.
* Checkpoints stay layout independent: `ZeroOptimizerState` reads the Adam moments out of ZeRO's fp32
  partitions into moe_train's canonical form and writes them back, so a DeepSpeed run resumes under the
  native engine (any layout) and vice versa.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_train.config import Config, ConfigError
from moe_train.engine_config import deepspeed_config_for
from moe_train.model import MoETransformer
from moe_train.model.build import model_init_specs
from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.launch import resolve_backend
from moe_train.parallel.materialize import materialize_chunks
from moe_train.parallel.parallelize import ParallelModel, shard_model
from moe_train.parallel.param_meta import get_meta
from moe_train.parallel.zero import STATE_KEYS
from moe_train.utils.logging import get_logger

log = get_logger(__name__)


def _import_deepspeed() -> Any:
    """deepspeed, without its CPU shared-memory all-reduce op: DeepSpeed JIT-compiles that op (minutes on a
    busy 2-core machine, and again whenever the build environment differs) for inference all-reduces only;
    training reduces through torch.distributed (gloo) on CPU either way."""
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as exc:
        raise ConfigError(f"engine.name=deepspeed needs DeepSpeed: pip install deepspeed ({exc})") from None
    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines (config dumps, timers) drown ours
    if get_accelerator().device_name() == "cpu":
        # by module path: deepspeed.comm re-exports the name `torch` (the torch package)
        setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)  # noqa: B010
    return deepspeed


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name of the expert / expert-data-parallel groups of expert-parallel size `ep`."""
    return f"ep_size_{ep}"


def _expert_groups_module(num_experts: int, groups: ProcessGroups) -> nn.Module:
    """A parameter-free instance of DeepSpeed's MoE type that creates its expert groups (see the module doc)."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups as ds_groups

    class ExpertGroups(MoE):  # type: ignore[misc]
        """Marks the model as MoE for the DeepSpeed engine; never called in forward."""

        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.num_experts, self.ep_size = num_experts, groups.ep_size
            self.expert_group_name = expert_group_name(groups.ep_size)
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if use_data_before_expert_parallel_:
                raise ConfigError("engine.deepspeed_config use_data_before_expert_parallel must be false")
            if self.expert_group_name not in ds_groups._get_expert_parallel_group_dict():
                ds_groups._create_expert_and_data_parallel(self.ep_size)
            ours = (groups.ranks["edp"], groups.ranks["ep"])
            theirs = tuple(
                dist.get_process_group_ranks(get(self.expert_group_name))
                for get in (ds_groups._get_expert_data_parallel_group, ds_groups._get_expert_parallel_group)
            )
            if tuple(sorted(r) for r in theirs) != tuple(sorted(r) for r in ours):
                raise RuntimeError(f"DeepSpeed expert groups (edp, ep) {theirs} differ from moe_train's {ours}")

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("ExpertGroups only marks the model for DeepSpeed; it has no forward")

    return ExpertGroups()


class DeepSpeedModule(nn.Module):
    """What DeepSpeed wraps: our model plus, under expert parallelism, the ExpertGroups marker."""

    def __init__(self, model: nn.Module, marker: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.expert_groups = marker

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def param_groups(model: nn.Module, weight_decay: float, ep: int) -> list[dict[str, Any]]:
    """moe_train's decay / no-decay groups (moe_train.train.optim), with expert parameters in their own
    groups marked for DeepSpeed (`moe: True`, named after their expert-data-parallel group) when ep > 1."""
    name = expert_group_name(ep)
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        meta = get_meta(param)
        expert = ep > 1 and meta is not None and meta.is_expert
        if expert:
            param.allreduce = False  # type: ignore[attr-defined]  # DeepSpeed's is_moe_param marker
            param.group_name = name  # type: ignore[attr-defined]
        buckets.setdefault((expert, param.ndim >= 2), []).append(param)
    out = []
    for (expert, decay), params in buckets.items():
        group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        group["name"] = name if expert else ("decay" if decay else "no_decay")
        if expert:
            group["moe"] = True
        out.append(group)
    return out


@dataclass
class DeepSpeedParallelModel(ParallelModel):
    """ParallelModel whose single chunk is the DeepSpeed engine; backward goes through the engine."""

    engine: Any = None

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch: engine.backward (loss already scaled by 1/M) and engine.step (updates on the last)."""
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()


def build_deepspeed(
    model: nn.Module, groups: ProcessGroups, cfg: Config, device: torch.device | None = None
) -> tuple[ParallelModel, Any]:
    """Shard `model` (expert parallel), wrap it with deepspeed.initialize; returns (pmodel, optimizer).

    A model on the meta device (build_model(cfg, device="meta")) is materialised on `device` after
    sharding, each rank initialising only its expert shards (moe_train.parallel.materialize); ZeRO 1/2
    keeps the dense parameters replicated, so those are whole on every rank by design."""
    deepspeed = _import_deepspeed()
    ds_config = deepspeed_config_for(cfg, groups.dp_size)
    if not dist.is_initialized():  # one process: DeepSpeed still wants a (one-rank) process group
        backend = resolve_backend(cfg.parallel.backend)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it; torchrun would have set it
    on_meta = isinstance(model, MoETransformer) and any(p.is_meta for p in model.parameters())
    specs = model_init_specs(model) if isinstance(model, MoETransformer) and on_meta else {}
    sharded = shard_model(model, groups, cfg)
    if on_meta:
        materialize_chunks(sharded.chunks, specs, cfg.train.seed, groups, device or torch.device("cpu"))
    (local,) = sharded.chunks
    marker = _expert_groups_module(cfg.moe.num_experts, groups) if groups.ep_size > 1 else None
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(local, o.weight_decay, groups.ep_size), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True
    )
    engine, zero, _, _ = deepspeed.initialize(
        model=DeepSpeedModule(local, marker), optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    stage = ds_config["zero_optimization"]["stage"]
    log.info("DeepSpeed engine: ZeRO stage %d, %s", stage, type(zero).__name__)
    pmodel = DeepSpeedParallelModel(chunks=[engine], groups=groups, engine=engine)
    return pmodel, ZeroOptimizerState(engine)


class ZeroOptimizerState:
    """The trainer's view of the DeepSpeed optimizer: learning-rate groups, the step's grad norm, and the
    Adam state in moe_train's canonical local form (see moe_train.parallel.zero.optimizer_local_state).

    ZeRO flattens each param group into one buffer, partitions it over the group's data-parallel ranks
    and keeps an fp32 partition per rank; each model parameter knows its fragment of that partition
    (`param._hp_mapping`). Reading the state fills each parameter's own fragment and sums over the
    group's ranks; writing copies each rank's fragment in.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.zero = engine.optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped AdamW's groups (set 'lr' here before the step)."""
        return self.zero.param_groups  # type: ignore[no-any-return]

    def grad_norm(self) -> float:
        """Global gradient norm before clipping of the last step (DeepSpeed's, over every parameter once)."""
        return float(self.engine.get_global_grad_norm())

    def _groups(self) -> list[tuple[list[nn.Parameter], torch.Tensor, Any]]:
        """(model parameters, fp32 partition, data-parallel group) of every ZeRO param group."""
        zero = self.zero
        return list(
            zip(zero.bit16_groups, zero.single_partition_of_fp32_groups, zero.real_dp_process_group, strict=True)
        )

    def _step(self) -> torch.Tensor | None:
        for _, flat, _ in self._groups():
            state = self.zero.optimizer.state.get(flat, {})
            if "step" in state:
                return torch.as_tensor(state["step"], dtype=torch.float32).detach().cpu().clone()
        return None

    @torch.no_grad()
    def local_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{canonical name: {step, exp_avg, exp_avg_sq}}, tensors shaped like the local parameter (a
        collective over each group's data-parallel ranks; every rank calls it)."""
        step = self._step()
        if step is None:
            return {}
        out: dict[str, dict[str, torch.Tensor]] = {}
        for params, flat, dp_group in self._groups():
            state = self.zero.optimizer.state[flat]
            for key in STATE_KEYS:
                buffer = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
                offset = 0
                for param in params:
                    frag = param._hp_mapping  # type: ignore[attr-defined]
                    if frag is not None:
                        lp, hp = frag.lp_fragment_address, frag.hp_fragment_address
                        src = state[key].narrow(0, hp.start, hp.numel)
                        buffer.narrow(0, offset + lp.start, lp.numel).copy_(src)
                    offset += param.numel()
                dist.all_reduce(buffer, group=dp_group)
                for param, piece in zip(params, buffer.split([p.numel() for p in params]), strict=True):
                    name = get_meta(param).canonical_name  # type: ignore[union-attr]
                    entry = out.setdefault(name, {"step": step.clone()})
                    entry[key] = piece.view_as(param).to(param.dtype).clone()
        return out

    @torch.no_grad()
    def load_local_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Refresh ZeRO's fp32 weights from the (just loaded) model and write the Adam state in."""
        self.zero.refresh_fp32_params()
        if not state:
            return
        step = next(iter(state.values()))["step"]
        for params, flat, _ in self._groups():
            target = self.zero.optimizer.state[flat]
            target["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
            for key in STATE_KEYS:
                target[key] = torch.zeros_like(flat)
                for param in params:
                    frag = param._hp_mapping  # type: ignore[attr-defined]
                    name = get_meta(param).canonical_name  # type: ignore[union-attr]
                    if frag is not None and name in state:
                        lp, hp = frag.lp_fragment_address, frag.hp_fragment_address
                        src = state[name][key].reshape(-1).narrow(0, lp.start, lp.numel)
                        target[key].narrow(0, hp.start, hp.numel).copy_(src)
