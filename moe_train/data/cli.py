"""`moe-train data build`: build a tokenized data directory from the demo sources or your own text.

moe-train data build                                  # demo corpus into data_cache/demo
moe-train data build --out data_cache/mine --input notes=docs/ --input chat=chat.jsonl
moe-train data build --out d --input web=hf:HuggingFaceFW/fineweb-edu#train --max-bytes 50000000
moe-train data build --out d --input web=part-0.parquet --workers 8 --shard-mb 512
moe-train data build --out d --tokenizer tok.json --megatron web=/data/web_text_document,/data/web2_text_document
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from moe_train.data.build import BuildOptions, build_dataset
from moe_train.data.demo import DEMO_DOMAINS, demo_sources
from moe_train.data.downloads import CACHE_ENV, default_cache_dir
from moe_train.data.errors import DataError
from moe_train.data.inputs import input_source, parse_input_spec
from moe_train.data.sources import TextSource, check_domain_name
from moe_train.data.tokenizer import EOS_TOKEN
from moe_train.utils.logging import setup_logging

log = logging.getLogger("moe_train.data.cli")

DEFAULT_OUT = "data_cache/demo"


def _add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a domain from a directory, .txt (blank-line separated documents), .jsonl ('text' field), "
        ".parquet/.arrow/.json/.csv (through HF datasets) or hf:NAME_OR_PATH[#SPLIT]; repeatable",
    )
    p.add_argument(
        "--demo",
        default=None,
        metavar="DOMAINS",
        help=f"comma-separated demo domains ({','.join(DEMO_DOMAINS)}) or 'all'; "
        "default all without --input, none with it",
    )
    p.add_argument("--tokenizer", default=None, help="use this tokenizer.json instead of training one")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained BPE (default 8192)")
    p.add_argument("--eos-token", default=EOS_TOKEN, help=f"end-of-document token (default {EOS_TOKEN})")
    p.add_argument(
        "--max-bytes",
        type=int,
        default=5_000_000,
        help="about this many bytes of text per domain, whole documents; 0 = no cap (default 5e6)",
    )
    p.add_argument("--val-fraction", type=float, default=0.01, help="bytes held out per domain (default 0.01)")
    p.add_argument("--val-min-bytes", type=int, default=32_768, help="hold out at least this (default 32768)")
    p.add_argument(
        "--tokenizer-sample-bytes",
        type=int,
        default=2_000_000,
        help="bytes per domain the tokenizer trains on (default 2e6)",
    )
    p.add_argument("--seed", type=int, default=1234, help="seed of the validation hold-out")
    p.add_argument(
        "--cache-dir", default=None, help=f"download cache (default ${CACHE_ENV} or ~/.cache/moe_train/downloads)"
    )
    p.add_argument("--text-field", default="text", help="field of .jsonl / hf rows holding the text")
    p.add_argument(
        "--license",
        action="append",
        default=[],
        metavar="NAME=LICENSE",
        help="licence recorded for an --input domain in SOURCES.md; repeatable",
    )
    p.add_argument(
        "--megatron",
        action="append",
        default=[],
        metavar="NAME=PREFIX[,PREFIX...]",
        help="a domain read in place from Megatron indexed datasets (.bin/.idx; needs --tokenizer); repeatable",
    )
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: one per CPU core)")
    p.add_argument("--shard-mb", type=float, default=256, help="largest .bin shard in MiB (default 256)")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `data` (with subcommand `build`) on the top-level CLI's subparsers."""
    data = subparsers.add_parser(
        "data",
        help="build tokenized training data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = data.add_subparsers(dest="data_command", metavar="{build}")
    sub.required = True
    build = sub.add_parser("build", help="download/read text, train a tokenizer, write token shards")
    _add_build_arguments(build)
    data.set_defaults(func=run_data)
    return data


def _demo_domains(args: argparse.Namespace) -> list[str]:
    if args.demo is None:
        return [] if args.input or args.megatron else list(DEMO_DOMAINS)
    if args.demo.strip() == "all":
        return list(DEMO_DOMAINS)
    return [d.strip() for d in args.demo.split(",") if d.strip()]


def _licenses(args: argparse.Namespace) -> dict[str, str]:
    out = {}
    for spec in args.license:
        name, sep, text = spec.partition("=")
        if not sep or not name or not text:
            raise DataError(f"--license {spec!r} must look like NAME=LICENSE")
        out[name] = text
    return out


def _sources(args: argparse.Namespace) -> list[TextSource]:
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    sources = demo_sources(_demo_domains(args), cache)
    licenses = _licenses(args)
    known = {parse_input_spec(s)[0] for s in args.input}
    unknown = sorted(set(licenses) - known)
    if unknown:
        raise DataError(f"--license names {', '.join(unknown)}, which no --input defines")
    for spec in args.input:
        name = parse_input_spec(spec)[0]
        sources.append(input_source(spec, args.text_field, licenses.get(name, "unknown (user-provided)")))
    return sources


def _megatron(args: argparse.Namespace) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in args.megatron:
        name, sep, prefixes = spec.partition("=")
        if not sep or not name or not prefixes:
            raise DataError(f"--megatron {spec!r} must look like NAME=PREFIX[,PREFIX...]")
        out[check_domain_name(name, f"--megatron {spec!r}")] = [p for p in prefixes.split(",") if p]
    return out


def _options(args: argparse.Namespace) -> BuildOptions:
    return BuildOptions(
        out=Path(args.out),
        sources=_sources(args),
        tokenizer=Path(args.tokenizer) if args.tokenizer else None,
        vocab_size=args.vocab_size,
        eos_token=args.eos_token,
        max_bytes=args.max_bytes,
        val_fraction=args.val_fraction,
        val_min_bytes=args.val_min_bytes,
        tokenizer_sample_bytes=args.tokenizer_sample_bytes,
        seed=args.seed,
        force=args.force,
        workers=args.workers,
        shard_bytes=int(args.shard_mb * 2**20),
        megatron=_megatron(args),
        extra={"argv": sys.argv[1:]},
    )


def _log_summary(manifest: dict[str, Any], seconds: float) -> None:
    for name, dom in manifest["domains"].items():
        log.info(
            "  %-10s %9d train tokens %8d val tokens %3d shard(s)  (%s)",
            name,
            dom["train"]["num_tokens"],
            dom["val"]["num_tokens"],
            len(dom["train"]["shards"]),
            dom["source"]["license"],
        )
    log.info("built in %.1f s", seconds)


def run_data(args: argparse.Namespace) -> int:
    """Run a `data` subcommand; returns the exit status (2 on a DataError, logged as one line)."""
    setup_logging("INFO")
    try:
        if args.data_command != "build":
            raise DataError(f"unknown data subcommand {args.data_command!r}")
        start = time.perf_counter()
        manifest = build_dataset(_options(args))
        _log_summary(manifest, time.perf_counter() - start)
    except DataError as exc:
        print(f"moe-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m moe_train.data.cli build ...`."""
    parser = argparse.ArgumentParser(prog="moe-train")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    return run_data(parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
