"""Meta-device construction, then per-shard materialisation: no rank ever holds the whole model.

`build_parallel_model(cfg, groups, device)`:

1. builds the single-device model on the meta device (shapes only, no storage) and records the init
   spec of every canonical tensor (moe_train.model.init);
2. applies TP/SP → EP → load-balance groups → PP (`shard_model`) to the meta model: every slice is
   a meta tensor and every local parameter gets its ParamMeta (canonical name, shape, shard splits);
3. materialises each local parameter and persistent buffer on `device` and fills it with its box of
   the canonical tensor (`shard_box`) from the counter-based initialiser, one tensor at a time;
4. attaches the data-parallel gradient reducer.

The values equal `build_model(cfg)` (one process) bit for bit under every layout, because an element's
value depends only on (train.seed, canonical name, canonical index). Peak memory of the build: this
rank's shards plus one working block of at most `INIT_BLOCK_ELEMS` elements (about 10 MB).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_train.config import Config
from moe_train.model.build import build_model, model_init_specs
from moe_train.model.init import InitSpec, Placement, materialize_module
from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.parallelize import ParallelModel, attach_grad_reducer, shard_model
from moe_train.parallel.param_meta import get_meta, named_buffers_with_meta, shard_box


def materialize_chunks(
    chunks: list[nn.Module],
    specs: dict[str, InitSpec],
    seed: int,
    groups: ProcessGroups,
    device: torch.device,
    initialise: bool = True,
) -> None:
    """Materialise every meta tensor of this rank's chunks as its own box of the canonical tensor
    (left uninitialised without `initialise`, for a resume that loads every tensor)."""

    def placement(local_name: str, tensor: torch.Tensor) -> Placement:
        meta = get_meta(tensor)
        if meta is None:
            raise RuntimeError(f"materialize: {local_name} has no ParamMeta (shard_model sets one on every tensor)")
        offsets, _ = shard_box(meta, groups)
        return meta.canonical_name, meta.canonical_shape, offsets

    for chunk in chunks:
        named_buffers_with_meta(chunk)  # persistent buffers get their (default) placement
        materialize_module(chunk, specs, seed, device, placement, initialise)


def build_parallel_model(
    cfg: Config, groups: ProcessGroups, device: torch.device, initialise: bool = True
) -> ParallelModel:
    """This rank's share of the model, built on the meta device and materialised shard by shard.

    `initialise=False` skips the initialiser (a resumed run overwrites every tensor from its checkpoint,
    and loading fails if one is missing)."""
    model = build_model(cfg, device="meta")
    specs = model_init_specs(model)
    pm = shard_model(model, groups, cfg)
    materialize_chunks(pm.chunks, specs, cfg.train.seed, groups, device, initialise)
    if pm.schedule is not None:
        pm.schedule.warm_up()
    return attach_grad_reducer(pm)
