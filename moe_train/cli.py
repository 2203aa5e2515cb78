"""`moe-train` command line: train | data | inspect | export | import | plan.

Every user error (config, data, checkpoint, run directory) ends as one line on stderr naming what is
wrong and where, with exit status 2; nothing is written before the inputs are validated. Under
torchrun the line is printed once (by the first rank that fails), not once per rank.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_train.config import ConfigError, load_config


def _user_errors() -> tuple[type[BaseException], ...]:
    from moe_train.data import DataError
    from moe_train.interop.hf_mapping import InteropError
    from moe_train.parallel.checkpoint_files import CheckpointError
    from moe_train.plan.search import PlanError
    from moe_train.train.anomaly import AnomalyError
    from moe_train.train.trainer import RunDirError

    return (ConfigError, DataError, CheckpointError, RunDirError, InteropError, OSError, PlanError, AnomalyError)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config with dotted overrides")
    p.add_argument("--config", help="YAML config file (defaults apply to missing keys)")
    p.add_argument("--resume", action="store_true", help="same as checkpoint.resume=latest")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the layout for --world-size ranks, print process groups and per-rank memory, exit",
    )
    p.add_argument("--world-size", type=int, default=None, help="ranks for --dry-run (default $WORLD_SIZE or 1)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 moe.num_experts=16")


def _add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="print parameter counts and FLOPs per token of a config; with RUN_DIR_OR_CHECKPOINT, analyse "
        "how a saved model routes the held-out sets (per-layer domain x expert heatmaps, specialisation, "
        "load imbalance) and, for a run directory, plot its data mixture over training (RUN_DIR/mixture.png)",
    )
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--out", help="routing analysis output directory (default <run dir>/inspect/<checkpoint>)")
    p.add_argument("overrides", nargs="*", help="[RUN_DIR_OR_CHECKPOINT] then dotted overrides")


def build_parser() -> argparse.ArgumentParser:
    from moe_train.data.cli import add_data_parser
    from moe_train.interop.cli import add_interop_parsers
    from moe_train.plan.cli import add_plan_parser

    parser = argparse.ArgumentParser(prog="moe-train", description="Pretrain Mixture-of-Experts language models.")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher (as $LOCAL_RANK)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    add_data_parser(sub)
    _add_inspect_parser(sub)
    add_interop_parsers(sub)
    add_plan_parser(sub)
    return parser


def _apply_local_rank(local_rank: int | None) -> None:
    """The deepspeed launcher passes --local_rank and sets LOCAL_RANK; they must agree."""
    import os

    if local_rank is None:
        return
    env = os.environ.get("LOCAL_RANK")
    if env is not None and env != str(local_rank):
        raise ConfigError(f"--local_rank ({local_rank}) differs from the environment's LOCAL_RANK ({env})")
    os.environ["LOCAL_RANK"] = str(local_rank)


def measured_peak_line(run_dir: str) -> str:
    """The measured peak memory of the run in `run_dir` (to hold against the dry run's estimate)."""
    from moe_train.train.memory import measured_peak_gb

    peak = measured_peak_gb(run_dir)
    if peak is None:
        return f"measured peak memory: none yet ({run_dir}/metrics.jsonl has no peak_mem_gb; train, then rerun)"
    return (
        f"measured peak memory ({run_dir}/metrics.jsonl, max over ranks and steps): {peak:.3f} GiB "
        "(CUDA max allocated, or CPU RSS high-water incl. activations and the runtime; the estimate above "
        "counts parameters, grads and Adam state only)"
    )


def _run_train(args: argparse.Namespace) -> int:
    import os

    from moe_train.parallel import destroy_distributed, dry_run_report, init_distributed
    from moe_train.train.trainer import Trainer
    from moe_train.utils.logging import setup_logging

    overrides = list(args.overrides) + (["checkpoint.resume=latest"] if args.resume else [])
    if args.world_size is not None and not args.dry_run:
        raise ConfigError("--world-size is only used with --dry-run (a real run takes it from torchrun)")
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        print(dry_run_report(cfg, world_size))
        print(measured_peak_line(cfg.run.dir))
        return 0
    setup_logging(cfg.log.level)
    groups = init_distributed(cfg)
    finished = False
    try:
        Trainer(cfg, groups).fit()
        finished = True
    finally:
        destroy_distributed(wait_for_all=finished)
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from moe_train.model import count_parameters, flops_per_token

    targets = [a for a in args.overrides if "=" not in a]
    if targets or args.out:
        return _run_inspect_routing(args, targets)
    cfg = load_config(args.config, args.overrides)
    counts = count_parameters(cfg.model, cfg.moe)
    flops = flops_per_token(cfg.model, cfg.moe, cfg.train.seq_len)
    print(f"parameters: total {counts.total:,} | active {counts.active:,} | embedding {counts.embedding:,}")
    print(f"training FLOPs per token (seq_len {cfg.train.seq_len}): {flops:,.0f}")
    return 0


def _run_inspect_routing(args: argparse.Namespace, targets: list[str]) -> int:
    """`inspect RUN_DIR_OR_CHECKPOINT [overrides]`: moe_train.analysis.inspect."""
    if len(targets) != 1 or args.config:
        raise ConfigError(
            f"inspect takes one RUN_DIR_OR_CHECKPOINT (got {targets or 'none'}) and no --config (the"
            " checkpoint's own config is used; dotted overrides apply on top)"
        )
    from moe_train.data.report import has_mixture_records, write_mixture_report

    target = Path(targets[0])
    mixture = has_mixture_records(target)
    if not mixture or (target / "checkpoints").is_dir() or args.out:
        from moe_train.analysis.inspect import format_report, inspect_routing

        out_dir, report = inspect_routing(targets[0], [a for a in args.overrides if "=" in a], args.out)
        print(format_report(out_dir, report))
    if mixture:
        print(f"wrote {write_mixture_report(target)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _apply_local_rank(args.local_rank)
        if args.command == "train":
            return _run_train(args)
        if args.command == "inspect":
            return _run_inspect(args)
        if args.command in ("export", "import"):
            from moe_train.interop.cli import run_interop

            return run_interop(args)
        if args.command == "plan":
            from moe_train.plan.cli import run_plan

            return run_plan(args)
        from moe_train.data.cli import run_data

        return run_data(args)
    except _user_errors() as exc:
        from moe_train.utils.logging import first_to_report_error

        if first_to_report_error():
            print(f"moe-train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
