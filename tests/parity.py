"""Parity harness: train a few steps under a parallel layout and compare with the single-process run.

fp32 parity cannot be bitwise: all-reduces and sharded matmuls sum in another order (~1e-7 relative).
AdamW's normalised update g / (sqrt(v) + eps) amplifies that noise for gradient elements near eps by
about lr / (4 eps); the runs use eps 1e-6 and lr 1e-3 so that five steps stay inside rtol 1e-5 /
atol 1e-6 on parameters of scale 0.02, while a wrong reduction moves parameters by ~lr.

`run_layouts(rank, world_size, layouts, run_root)` is a worker for `run_distributed`: for each layout
(a name and dotted overrides) it builds the process groups, trains with the real Trainer, and returns
per-step records plus the final parameters reassembled into canonical (single-device) tensors on rank
0. `reference_run(overrides)` is the single-process run of the same config. `assert_parity` compares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_train.config import Config, load_config
from moe_train.parallel.groups import ProcessGroups, build_process_groups
from moe_train.parallel.parallelize import ParallelModel
from moe_train.parallel.param_meta import owns_unique_copy, shard_box

BASE = [
    "model.hidden_size=32",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=8",
    "model.ffn_hidden_size=64",
    "model.vocab_size=128",
    "moe.num_experts=8",
    "moe.top_k=2",
    "moe.expert_ffn_hidden_size=32",
    "moe.num_shared_experts=1",
    "moe.first_k_dense=1",
    "moe.lbl.coeff=0.01",
    "moe.zloss_coeff=0.001",
    "data.mock=true",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.seq_len=16",
    "train.max_steps=5",
    "train.eval_every=5",
    "train.eval_batches=1",
    "train.log_every=100",
    "optim.lr=1e-3",
    "optim.eps=1e-6",
    "optim.warmup_steps=1",
    "optim.grad_clip=0.05",
    "checkpoint.every=0",
    "log.tensorboard=false",
    "log.level=WARNING",
]
RECORD_KEYS = ("loss", "lm_loss", "lbl", "zloss", "grad_norm")


def layout_config(overrides: list[str], run_dir: Path) -> Config:
    return load_config(None, [*BASE, *overrides, f"run.dir={run_dir}"])


def canonical_parameters(pm: ParallelModel, groups: ProcessGroups) -> dict[str, torch.Tensor] | None:
    """Reassemble every parameter into its canonical tensor on rank 0 (None on other ranks)."""
    pieces = []
    params = dict(pm.named_parameters())
    for name, meta in pm.metas().items():
        if owns_unique_copy(meta, groups):
            param = params[name]
            offsets, lengths = shard_box(meta, groups)
            slices = tuple(slice(o, o + n) for o, n in zip(offsets, lengths, strict=True))
            pieces.append((meta.canonical_name, meta.canonical_shape, slices, param.detach()))
    if groups.world_size == 1:
        gathered = [pieces]
    else:
        gathered = [None] * groups.world_size
        dist.gather_object(pieces, gathered if groups.rank == 0 else None, dst=0)
    if groups.rank != 0:
        return None
    out: dict[str, torch.Tensor] = {}
    for rank_pieces in gathered:
        for name, shape, slices, tensor in rank_pieces:  # type: ignore[union-attr]
            full = out.setdefault(name, torch.full(shape, float("nan")))
            full[slices] = tensor
    return out


def train_layout(rank: int, world_size: int, overrides: list[str], run_dir: Path, sabotage: Any = None) -> dict:
    """Train one layout on this rank; rank 0 returns records, canonical parameters, validation losses and
    the number of graphs dynamo compiled (train.compile)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from moe_train.parallel import materialize
    from moe_train.train import trainer as trainer_module

    torch._dynamo.reset()  # per layout: compile afresh and count the graphs train.compile makes
    counters.clear()
    cfg = layout_config(overrides, run_dir)
    groups = build_process_groups(cfg, world_size, rank)
    original = materialize.shard_model
    if sabotage is not None:  # replaces the sharding step (on the meta model, before materialisation)
        materialize.shard_model = sabotage  # type: ignore[assignment]
    try:
        trainer = trainer_module.Trainer(cfg, groups)
    finally:
        materialize.shard_model = original
    records = trainer.fit()
    params = canonical_parameters(trainer.pmodel, groups)
    val = trainer.evaluate()
    records = [{k: r[k] for k in RECORD_KEYS} for r in records]
    return {"records": records, "params": params, "val": val, "graphs": int(counters["stats"]["unique_graphs"])}


def run_layouts(rank: int, world_size: int, layouts: dict[str, list[str]], run_root: Path, sabotage: Any) -> dict:
    """Worker: every layout in turn (one process-group spawn for all of them)."""
    results = {}
    for name, overrides in layouts.items():
        results[name] = train_layout(rank, world_size, overrides, run_root / name, sabotage.get(name))
        dist.barrier()
    return results


def reference_run(overrides: list[str], run_dir: Path) -> dict:
    """The single-process run of the same config (the parallel-only keys dropped)."""
    from moe_train.train.trainer import Trainer

    kept = [o for o in overrides if not o.startswith("parallel.")]
    trainer = Trainer(layout_config(kept, run_dir))
    records = trainer.fit()
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    val = trainer.evaluate()
    return {"records": [{k: r[k] for k in RECORD_KEYS} for r in records], "params": params, "val": val}


def train_steps(run_dir: Path, overrides: list[str], steps: int) -> dict[str, Any]:
    """`steps` real trainer steps in this process: per-step (lm loss, lbl, z-loss, grad norm), routing
    counts of every step, the final parameters and the trainer itself."""
    from moe_train.train.trainer import Trainer

    cfg = load_config(None, [*BASE, f"train.max_steps={steps}", f"run.dir={run_dir}", *overrides])
    trainer = Trainer(cfg)
    records, counts = [], []
    for _ in range(steps):
        result = trainer.train_step()
        trainer.state.step += 1
        trainer.state.consumed_samples += cfg.train.global_batch_size
        records.append((result.lm_loss, result.lbl, result.zloss, result.grad_norm))
        counts.append(result.routing_counts_LDE)
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return {"records": records, "counts": counts, "params": params, "trainer": trainer}


def record_errors(got: list[dict], want: list[dict], rtol: float = 1e-5, atol: float = 1e-6) -> list[str]:
    """Every per-step mismatch of RECORD_KEYS (steps named by their "step" key, else counted from 1)."""
    errors = []
    for index, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        for key in RECORD_KEYS:
            if abs(g[key] - w[key]) > atol + rtol * abs(w[key]):
                errors.append(f"step {g.get('step', index)} {key}: {g[key]!r} != {w[key]!r}")
    return errors


def parity_errors(result: dict, reference: dict, rtol: float = 1e-5, atol: float = 1e-6) -> list[str]:
    """Every mismatch between a layout's run and the reference (empty when they agree)."""
    errors = record_errors(result["records"], reference["records"], rtol, atol)
    for domain, want_val in reference["val"].items():
        got_val = result["val"][domain]
        if abs(got_val - want_val) > atol + rtol * abs(want_val):
            errors.append(f"validation loss {domain}: {got_val!r} != {want_val!r}")
    params = result["params"]
    if set(params) != set(reference["params"]):
        errors.append(f"parameter names differ: {sorted(set(params) ^ set(reference['params']))[:5]}")
        return errors
    for name, want in reference["params"].items():
        got = params[name]
        if torch.isnan(got).any():
            errors.append(f"{name}: not every element was reassembled")
        elif not torch.allclose(got, want, rtol=rtol, atol=atol):
            errors.append(f"{name}: max abs diff {(got - want).abs().max().item():.3e}")
    return errors


class SyncCounter:
    """Counts the tensor -> Python conversions (each a device-to-host sync on an accelerator).

    `host_tensors`: a callable's name on a module whose results are host copies already (e.g. the
    trainer's `read_back`): conversions of tensors sharing their storage are not counted (on this CPU
    machine every tensor is a host tensor, so the counter must be told which ones the device never held).
    """

    NAMES = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, host_tensors: tuple[Any, str] | None = None) -> None:
        self.calls: dict[str, int] = {}
        self.originals: dict[str, Any] = {}
        self.host_storages: set[int] = set()
        self.host_tensors = host_tensors

    def __enter__(self) -> SyncCounter:
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            self.originals[name] = original

            def counted(t: torch.Tensor, *a: Any, _name: str = name, _orig: Any = original, **k: Any) -> Any:
                if t.untyped_storage().data_ptr() not in self.host_storages:
                    self.calls[_name] = self.calls.get(_name, 0) + 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        if self.host_tensors is not None:
            module, attr = self.host_tensors
            original_fn = getattr(module, attr)
            self.originals_fn = (module, attr, original_fn)

            def noted(*a: Any, **k: Any) -> Any:
                out = original_fn(*a, **k)
                self.host_storages.update(t.untyped_storage().data_ptr() for t in out)
                return out

            setattr(module, attr, noted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)
        if self.host_tensors is not None:
            setattr(*self.originals_fn[:2], self.originals_fn[2])

    @property
    def total(self) -> int:
        return sum(self.calls.values())
