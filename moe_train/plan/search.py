"""Enumerate layouts, predict each, keep the valid ones that fit, rank by throughput.

The cost model runs first on every combination whose sizes divide (dp and edp must be integers to
predict anything); candidates are then taken best-first and checked with the trainer's own rules
(`validate_plan_layout` -> `moe_train.parallel.layout.validate_layout`) until `top` valid ones are
found. So validity has one source of truth, and the slow check runs only on the few best layouts.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from moe_train.config import Config, ConfigError
from moe_train.plan.cluster import Cluster
from moe_train.plan.memory import MemoryBreakdown, peak_memory
from moe_train.plan.space import (
    RECOMPUTE_MODES,
    PlanLayout,
    PlanOptions,
    balanced_split,
    layout_from_config,
    options_from_config,
    recipe_for,
    tail_split,
    validate_plan_layout,
)
from moe_train.plan.time import TimeBreakdown, step_time
from moe_train.plan.workload import build_workload


class PlanError(ValueError):
    """No layout fits (the message names the smallest GPU count that would), or bad planner input."""


@dataclass(frozen=True)
class Candidate:
    """One evaluated layout."""

    layout: PlanLayout
    memory: MemoryBreakdown
    time: TimeBreakdown | None
    """None when the search skipped a layout that does not fit."""
    fits: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "layout": self.layout.__dict__ | {"label": self.layout.label()},
            "memory_bytes": self.memory.as_dict(),
            "time_s": self.time.as_dict() if self.time else None,
            "fits": self.fits,
        }


def evaluate(
    cfg: Config, layout: PlanLayout, options: PlanOptions, world: int, cluster: Cluster, time_if_fits: bool = False
) -> Candidate:
    """Memory and step time of `layout` on `world` ranks (no validity check). With time_if_fits, the
    step time of a layout that does not fit is not computed (time None): the search's fast path."""
    w = build_workload(cfg, layout, options, world)
    recipe = recipe_for(cfg, layout, options)
    memory = peak_memory(w, recipe)
    fits = memory.total <= cluster.usable_bytes
    time = step_time(w, recipe, cluster) if fits or not time_if_fits else None
    return Candidate(layout, memory, time, fits)


def predict(cfg: Config, world: int, cluster: Cluster, options: PlanOptions | None = None) -> Candidate:
    """Peak memory and step time of `cfg` exactly as configured, on `world` ranks (validated first).

    This is what a calibration compares with a measured run: same config, same world size.
    """
    options = options or options_from_config(cfg)
    layout = layout_from_config(cfg)
    validate_plan_layout(cfg, layout, options, world)
    return evaluate(cfg, layout, options, world, cluster)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(limit.bit_length()) if 2**i <= limit]


def parallel_shapes(cfg: Config, world: int, options: PlanOptions, cluster: Cluster) -> list[PlanLayout]:
    """Every (tp, cp, pp, vpp, ep, etp, mbs) whose dp and edp are integers and whose batch splits;
    recompute and zero1 are added by `enumerate_layouts`."""
    m, moe, G = cfg.model, cfg.moe, options.global_batch_size
    tps = [t for t in _powers_of_two(min(8, cluster.nvlink_domain)) if world % t == 0]
    pps = [p for p in _divisors(world) if p <= m.num_layers]
    eps = [e for e in _divisors(moe.num_experts) if world % e == 0]
    etps = [t for t in _powers_of_two(8) if moe.expert_ffn_hidden_size % t == 0]
    out = []
    for tp, cp, pp in itertools.product(tps, options.cp_sizes, pps):
        if world % (tp * cp * pp):
            continue
        dp = world // (tp * cp * pp)
        for ep, etp in itertools.product(eps, etps):
            if world % (ep * etp * pp):
                continue
            for mbs in options.micro_batch_sizes:
                if G % (dp * mbs):
                    continue
                for vpp in _vpps(m.num_layers, pp, options.max_vpp):
                    splits = {balanced_split(m.num_layers, pp * vpp), tail_split(m.num_layers, pp * vpp)}
                    for split in sorted(splits, key=lambda s: s or ()):
                        out.append(PlanLayout(tp, cp, pp, vpp, ep, etp, mbs, pp_layer_split=split))
    return out


def _vpps(num_layers: int, pp: int, max_vpp: int) -> list[int]:
    if pp == 1:
        return [1]
    return [v for v in range(1, max_vpp + 1) if num_layers >= pp * v]


def state_choices(cfg: Config, options: PlanOptions) -> list[tuple[str, bool]]:
    """(recompute, zero1) pairs, cheapest first: recompute only adds time, and so does ZeRO-1's gather."""
    zero = (False, True) if cfg.engine.name == "native" and options.recipe is None else (False,)
    modes = [m for m in RECOMPUTE_MODES if m in options.recompute_modes]
    return [(rc, z) for rc in modes for z in zero]


def enumerate_layouts(cfg: Config, world: int, options: PlanOptions, cluster: Cluster) -> list[PlanLayout]:
    """parallel_shapes x recompute modes x zero1 (native engine only)."""
    return [
        dataclasses.replace(shape, recompute=rc, zero1=z)
        for shape in parallel_shapes(cfg, world, options, cluster)
        for rc, z in state_choices(cfg, options)
    ]


def _shape_candidates(
    cfg: Config, shape: PlanLayout, options: PlanOptions, world: int, cluster: Cluster, require_fit: bool
) -> list[Candidate]:
    """The (recompute, zero1) variants of one shape worth timing. With require_fit, a variant is skipped
    when a cheaper one that fits dominates it: (rc, False) fitting dominates every later pair, (rc, True)
    fitting dominates later (rc', True). Raises ValueError when the pipeline schedule cannot run."""
    out: list[Candidate] = []
    fit_plain = fit_zero = False
    for rc, z in state_choices(cfg, options):
        if fit_plain or (z and fit_zero):
            continue
        cand = evaluate(cfg, dataclasses.replace(shape, recompute=rc, zero1=z), options, world, cluster, require_fit)
        if cand.time is not None:
            out.append(cand)
        if cand.fits:
            fit_plain, fit_zero = fit_plain or not z, fit_zero or z
    return out


def search(
    cfg: Config, world: int, cluster: Cluster, options: PlanOptions, top: int = 5, require_fit: bool = True
) -> tuple[list[Candidate], int]:
    """(the `top` fastest valid layouts that fit, number of shapes evaluated). With require_fit False
    the memory limit is ignored (to compare with a published layout that used memory tricks the model lacks)."""
    scored: list[Candidate] = []
    count = 0
    for shape in parallel_shapes(cfg, world, options, cluster):
        try:
            scored += _shape_candidates(cfg, shape, options, world, cluster, require_fit)
        except ValueError:  # the trainer's pipeline schedule cannot run this batch split
            continue
        count += 1
    fitting = sorted(scored, key=lambda c: c.time.step if c.time else 0.0)
    best: list[Candidate] = []
    for cand in fitting:
        try:
            validate_plan_layout(cfg, cand.layout, options, world)
        except ConfigError:
            continue
        best.append(cand)
        if len(best) == top:
            break
    return best, count


def smallest_world(cfg: Config, cluster: Cluster, options: PlanOptions, start: int, limit: int = 65536) -> int | None:
    """The smallest GPU count >= start (multiples of the node size, then powers of two) where a layout fits."""
    node = cluster.gpus_per_node
    counts = sorted({n for n in range(start, min(limit, 64 * node) + 1) if n % node == 0 or n < node})
    counts += [2**i for i in range(20) if 64 * node < 2**i <= limit]
    for n in counts:
        if n >= start and fits_somewhere(cfg, n, cluster, options):
            return n
    return None


def fits_somewhere(cfg: Config, world: int, cluster: Cluster, options: PlanOptions) -> bool:
    """Whether any valid layout fits on `world` GPUs: only each shape's least-memory variant (the last
    state choice: most recompute, ZeRO-1 where possible) is checked, most-sharded shapes first."""
    rc, z = state_choices(cfg, options)[-1]
    shapes = parallel_shapes(cfg, world, options, cluster)
    shapes.sort(key=lambda s: -(s.tp * s.cp * s.pp * s.ep * s.etp))
    for shape in shapes:
        lay = dataclasses.replace(shape, recompute=rc, zero1=z)
        try:
            if not evaluate_memory_fits(cfg, lay, options, world, cluster):
                continue
            validate_plan_layout(cfg, lay, options, world)
        except ValueError:  # ConfigError is a ValueError; so is a schedule that cannot run
            continue
        return True
    return False


def evaluate_memory_fits(cfg: Config, layout: PlanLayout, options: PlanOptions, world: int, cluster: Cluster) -> bool:
    """Whether `layout`'s peak memory fits (no step time)."""
    w = build_workload(cfg, layout, options, world)
    return peak_memory(w, recipe_for(cfg, layout, options)).total <= cluster.usable_bytes


def plan(cfg: Config, world: int, cluster: Cluster, options: PlanOptions, top: int = 5) -> tuple[list[Candidate], int]:
    """`search`, or PlanError with one line naming the smallest GPU count that would fit."""
    if world < 1:
        raise PlanError(f"--gpus ({world}) must be >= 1")
    best, count = search(cfg, world, cluster, options, top)
    if best:
        return best, count
    smallest = smallest_world(cfg, cluster, options, world + 1)
    where = f"the smallest GPU count that fits is {smallest}" if smallest else "no GPU count up to 65536 fits"
    raise PlanError(
        f"no valid layout of this model fits {world} x {cluster.name} "
        f"({cluster.usable_bytes / 1e9:.0f} GB usable per GPU, seq_len {options.seq_len}, "
        f"global batch {options.global_batch_size}); {where}"
    )
