"""Scale proof: train configs/scale_proof_cpu.yaml (a 0.86B-parameter MoE, 3.42 GB in fp32) on 8 CPU ranks
and compare every rank's peak memory (peak_mem_gb: the max over ranks of the RSS high-water mark) with
the size of the full model. No rank may come near the model's size: each builds the model on the meta
device and materialises only its shards.

    python benchmarks/scale_proof.py [--ranks 8] [override ...]     # needs ~19 GB free; minutes

Prints the model size, the per-step peak and their ratio; exits 1 if the peak reaches the model's size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from moe_train.config import load_config
from moe_train.model import count_parameters

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "scale_proof_cpu.yaml"
GIB = 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. moe.num_experts=32")
    args = parser.parse_args()
    cfg = load_config(str(CONFIG), args.overrides)
    model_bytes = count_parameters(cfg.model, cfg.moe).total * 4
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks)]
        cmd += ["-m", "moe_train.cli", "train", "--config", str(CONFIG), *args.overrides, f"run.dir={tmp}/run"]
        subprocess.run(cmd, check=True)
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if '"peak_mem_gb"' in line]
    print(f"model: {count_parameters(cfg.model, cfg.moe).total:,} parameters, {model_bytes / GIB:.2f} GiB fp32")
    for r in records:
        ratio = r["peak_mem_gb"] * GIB / model_bytes
        print(f"step {r['step']}: peak RSS of the largest rank {r['peak_mem_gb']:.2f} GiB = {ratio:.2f} x the model")
    worst = max(r["peak_mem_gb"] for r in records) * GIB
    return 0 if worst < model_bytes else 1


if __name__ == "__main__":
    sys.exit(main())
