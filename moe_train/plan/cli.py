"""`moe-train plan`: arguments and dispatch (the models live in memory.py / time.py, the search in search.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from moe_train.plan.cluster import CLUSTERS

if TYPE_CHECKING:
    from moe_train.config import Config
    from moe_train.plan.space import PlanOptions


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="rank parallel layouts of a model for N GPUs by predicted throughput")
    p.add_argument("--config", required=True, help="model YAML config (its train.* give the defaults below)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--cluster", default="h100-ib", help=f"one of {', '.join([*CLUSTERS, 'cpu-local'])}")
    p.add_argument("--seq-len", type=int, default=None, help="default: the config's train.seq_len")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: config's)")
    p.add_argument("--top", type=int, default=5, help="how many layouts to print (default 5)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp8"], default=None, help="GEMM precision")
    p.add_argument("--dispatch-dtype", choices=["fp32", "bf16", "fp8"], default=None, help="EP payload dtype")
    p.add_argument(
        "--expert-load", type=float, default=None, help="max/mean expert load for memory (default: dropless worst case)"
    )
    p.add_argument("--recompute", default=None, help="modes to search, e.g. none,selective,full")
    p.add_argument("--cp", default=None, help="context-parallel sizes to search, e.g. 1,2,4")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--png", default=None, help="write a PNG chart of the breakdowns here")
    p.add_argument("--write-config", default=None, help="write the best layout as a full config YAML here")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the model config")


def _csv(text: str, cast: type, flag: str) -> tuple:
    from moe_train.plan.search import PlanError

    try:
        return tuple(cast(x) for x in text.split(",") if x)
    except ValueError:
        raise PlanError(f"{flag} ({text!r}) must be a comma-separated list") from None


def _options(cfg: Config, args: argparse.Namespace) -> PlanOptions:
    from moe_train.plan.search import PlanError
    from moe_train.plan.space import RECOMPUTE_MODES, options_from_config

    over: dict[str, object] = {}
    for flag, value, key in (
        ("--seq-len", args.seq_len, "seq_len"),
        ("--global-batch", args.global_batch, "global_batch_size"),
    ):
        if value is not None:
            if value < 1:
                raise PlanError(f"{flag} ({value}) must be >= 1")
            over[key] = value
    if args.precision:
        over["gemm_precision"] = args.precision
        over["activation_bytes"] = 4.0 if args.precision == "fp32" else 2.0
    if args.dispatch_dtype:
        over["dispatch_dtype"] = args.dispatch_dtype
    if args.expert_load is not None:
        over["expert_load"] = args.expert_load
    modes = _csv(args.recompute, str, "--recompute") if args.recompute else None
    if modes is None:
        modes = RECOMPUTE_MODES
    if any(m not in RECOMPUTE_MODES for m in modes):
        raise PlanError(f"--recompute ({args.recompute}) must list modes of {', '.join(RECOMPUTE_MODES)}")
    over["recompute_modes"] = modes
    cps = _csv(args.cp, int, "--cp") if args.cp else (1, 2, 4, 8)
    if any(c < 1 for c in cps):
        raise PlanError(f"--cp ({args.cp}) sizes must be >= 1")
    over["cp_sizes"] = cps
    over["cp_comm"] = "allgather"  # what the trainer builds: K/V all-gather (moe_train/parallel/context_parallel.py)
    return options_from_config(cfg, **over)


def run_plan(args: argparse.Namespace) -> int:
    from moe_train.config import load_config
    from moe_train.plan.cluster import get_cluster
    from moe_train.plan.report import format_table, layout_overrides, to_json, write_chart, write_config
    from moe_train.plan.search import PlanError, plan

    cfg = load_config(args.config, args.overrides)
    try:
        cluster = get_cluster(args.cluster)
    except ValueError as exc:
        raise PlanError(f"--cluster: {exc}") from None
    if args.top < 1:
        raise PlanError(f"--top ({args.top}) must be >= 1")
    for flag, path in (("--png", args.png), ("--write-config", args.write_config)):
        if path and Path(path).exists():
            raise PlanError(f"{flag} {path} already exists (nothing was written)")
    options = _options(cfg, args)
    best, evaluated = plan(cfg, args.gpus, cluster, options, top=args.top)
    print(
        to_json(best, cluster, args.gpus, options, evaluated)
        if args.json
        else format_table(best, cluster, args.gpus, evaluated)
    )
    if not args.json:
        print("train it: moe-train train --config CONFIG " + " ".join(layout_overrides(cfg, best[0], options)))
    if args.png:
        write_chart(best, cluster, Path(args.png))
    if args.write_config:
        write_config(cfg, best[0], options, Path(args.write_config))
    if args.png or args.write_config:
        print("wrote " + ", ".join(p for p in (args.png, args.write_config) if p), file=sys.stderr)
    return 0
