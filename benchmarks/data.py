"""Data-pipeline benchmark: sampling + packing + collation tokens/s vs the demo model's training tokens/s,
and `moe-train data build` throughput and peak memory on a corpus >= 10x the demo's, same run.

1. Loader: TrainData (mixture sampler under a policy, packed samples read from the Megatron shards,
   collated into micro-batch tensors) hands out the global batches of configs/tiny_cpu.yaml without
   training; the peer is Trainer.train_step on the same config and data (the demo model). Repetitions
   alternate loader and trainer; tokens/s are medians, `ratio` the median of per-repetition ratios.
2. Build: the demo sources without the byte cap are written as jsonl and cycled until the corpus has
   >= `--scale` x the demo's 20 MB of text; `moe-train data build` (given the demo tokenizer, so only
   streaming + tokenisation + shard writing are timed) runs on 1/4 of it and on all of it, with
   `--workers` processes and `--shard-mb` shards. Peak RSS of the builder process and of its largest
   worker come from getrusage inside the build's own process. The peer is the bare tokenizer:
   encode_batch on 8 MB of the same text in memory, measured just before and just after each build.

    .venv/bin/python benchmarks/data.py                        # both parts
    .venv/bin/python benchmarks/data.py --skip-build --reps 5  # loader only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_BYTES = 20_000_000


def _machine() -> str:
    load = os.getloadavg()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load[0]:.1f} {load[1]:.1f}"


def _cli(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "moe_train.cli", *args], check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def _demo_config(data: Path, run_dir: Path, policy: str) -> object:
    from moe_train.config import load_config

    extra = [] if policy == "static" else [f"data.mixture.policy={policy}", "data.mixture.update_every=1"]
    return load_config(
        ROOT / "configs/tiny_cpu.yaml",
        [f"data.dir={data}", f"run.dir={run_dir}", "log.tensorboard=false", "checkpoint.every=0", *extra],
    )


def bench_loader(data: Path, work: Path, reps: int, batches: int, steps: int) -> dict:
    import numpy as np

    from moe_train.data.loader import TrainData
    from moe_train.train.trainer import Trainer

    cfg = _demo_config(data, work / "bench_run", "odm")
    tokens_per_batch = cfg.train.global_batch_size * cfg.train.seq_len  # type: ignore[attr-defined]
    trainer = Trainer(cfg)  # type: ignore[arg-type]
    for _ in range(2):
        trainer.train_step()
        trainer.state.step += 1
        trainer.state.consumed_samples += cfg.train.global_batch_size  # type: ignore[attr-defined]
    loader_tps, train_tps, ratios = [], [], []
    for _ in range(reps):
        data_obj = TrainData(cfg)  # type: ignore[arg-type]
        data_obj.start(0, 0, None, None)
        start = time.perf_counter()
        for step in range(batches):
            data_obj.micro_batches(step, step * cfg.train.global_batch_size)  # type: ignore[attr-defined]
            data_obj.observe(step, np.ones(4), np.ones(4))
        loader_tps.append(batches * tokens_per_batch / (time.perf_counter() - start))
        data_obj.close()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
            trainer.state.step += 1
            trainer.state.consumed_samples += cfg.train.global_batch_size  # type: ignore[attr-defined]
        train_tps.append(steps * tokens_per_batch / (time.perf_counter() - start))
        ratios.append(loader_tps[-1] / train_tps[-1])
    trainer.data.close()
    return {
        "loader_tokens_per_s": statistics.median(loader_tps),
        "train_tokens_per_s": statistics.median(train_tps),
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
    }


def make_corpus(work: Path, scale: int) -> tuple[Path, int]:
    """jsonl per demo domain, cycled until >= scale x the demo's text; returns (dir, bytes)."""
    from moe_train.data.demo import DEMO_DOMAINS, demo_sources
    from moe_train.data.downloads import default_cache_dir

    out = work / f"corpus_x{scale}"
    target = scale * DEMO_BYTES
    if (out / "done").is_file():
        return out, int((out / "done").read_text())
    out.mkdir(parents=True, exist_ok=True)
    docs = {s.info.domain: list(s.documents()) for s in demo_sources(list(DEMO_DOMAINS), default_cache_dir())}
    per_domain = target // len(docs) + 1
    total = 0
    for name, texts in docs.items():
        written, copy = 0, 0
        with (out / f"{name}.jsonl").open("w") as fh:
            while written < per_domain:
                for text in texts:
                    line = json.dumps({"text": f"[copy {copy}]\n{text}"})
                    fh.write(line + "\n")
                    written += len(text.encode()) + 10
                    if written >= per_domain:
                        break
                copy += 1
        total += written
    (out / "done").write_text(str(total))
    return out, total


def _quarter(corpus: Path, work: Path) -> Path:
    out = work / "corpus_quarter"
    if out.is_dir():
        return out
    out.mkdir()
    for path in corpus.glob("*.jsonl"):
        size = path.stat().st_size // 4
        with path.open() as src, (out / path.name).open("w") as dst:
            for line in src:
                dst.write(line)
                if dst.tell() >= size:
                    break
    return out


_MEASURE = (
    "import json, resource, sys\n"
    "from moe_train.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "rss = [resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]\n"
    "sys.stderr.write('PEAK ' + json.dumps(rss) + '\\n')\n"
    "sys.exit(rc)\n"
)


def _build(corpus: Path, out: Path, tokenizer: Path, workers: int, shard_mb: float) -> tuple[float, float, float]:
    """(seconds, peak RSS MiB of the builder process, of its largest worker) of one build."""
    shutil.rmtree(out, ignore_errors=True)
    inputs = [arg for p in sorted(corpus.glob("*.jsonl")) for arg in ("--input", f"{p.stem}={p}")]
    args = ["data", "build", "--out", str(out), *inputs, "--tokenizer", str(tokenizer), "--max-bytes", "0"]
    args += ["--workers", str(workers), "--shard-mb", str(shard_mb)]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *args], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    line = next(x for x in proc.stderr.splitlines() if x.startswith("PEAK "))
    own, children = json.loads(line[5:])
    return seconds, own / 1024, children / 1024


def bench_tokenizer(corpus: Path, tokenizer: Path, nbytes: int = 8_000_000) -> float:
    """MB/s of bare encode_batch on nbytes of the corpus text, in memory."""
    from moe_train.data.tokenizer import encode_documents, load_tokenizer

    texts, size = [], 0
    for path in sorted(corpus.glob("*.jsonl")):
        with path.open() as fh:
            for line in fh:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1].encode())
                if size >= nbytes * (sorted(corpus.glob("*.jsonl")).index(path) + 1) / 4:
                    break
    tok = load_tokenizer(tokenizer)
    start = time.perf_counter()
    for i in range(0, len(texts), 256):
        encode_documents(tok, texts[i : i + 256])
    return size / 1e6 / (time.perf_counter() - start)


def bench_build(work: Path, tokenizer: Path, scale: int, workers: int, shard_mb: float) -> dict:
    corpus, total = make_corpus(work, scale)
    quarter = _quarter(corpus, work)
    quarter_bytes = sum(p.stat().st_size for p in quarter.glob("*.jsonl"))
    results: dict = {"corpus_mb": total / 1e6, "quarter_corpus_mb": quarter_bytes / 1e6, "workers": workers}
    peers = [bench_tokenizer(corpus, tokenizer)]
    for name, src, size in (("quarter", quarter, quarter_bytes), ("full", corpus, total)):
        seconds, own, worker = _build(src, work / f"built_{name}", tokenizer, workers, shard_mb)
        peers.append(bench_tokenizer(corpus, tokenizer))
        peer = (peers[-2] + peers[-1]) / 2  # the bare tokenizer measured just before and just after
        results[name] = {
            "mb_per_s": size / 1e6 / seconds,
            "seconds": seconds,
            "peak_rss_builder_mib": own,
            "peak_rss_worker_mib": worker,
            "bare_tokenizer_mb_per_s": peer,
            "ratio_vs_bare_tokenizer": size / 1e6 / seconds / peer,
        }
    manifest = json.loads((work / "built_full" / "manifest.json").read_text())["domains"]
    results["shards_per_domain"] = {name: len(d["train"]["shards"]) for name, d in manifest.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/moe_train_bench_data", help="scratch directory")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batches", type=int, default=200, help="global batches per loader repetition")
    parser.add_argument("--steps", type=int, default=3, help="training steps per trainer repetition")
    parser.add_argument("--scale", type=int, default=10, help="corpus size in units of the demo's 20 MB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-mb", type=float, default=16, help="shard size of the build (several per domain)")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    demo = work / "demo"
    if not (demo / "manifest.json").is_file():
        _cli("data", "build", "--out", str(demo))
    results: dict = {"machine": _machine()}
    if not args.skip_loader:
        results["loader"] = bench_loader(demo, work, args.reps, args.batches, args.steps)
    if not args.skip_build:
        results["build"] = bench_build(work, demo / "tokenizer.json", args.scale, args.workers, args.shard_mb)
    results["machine_after"] = _machine()
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
