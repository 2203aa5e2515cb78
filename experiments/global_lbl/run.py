"""Micro-batch vs global-batch LBL vs aux-loss-free balancing on the built-in multi-domain corpus.

Claim under test (Qiu et al., "Demons in the Detail", arXiv 2501.11873): computing the LBL's f_i over
the global batch instead of each micro-batch lowers perplexity and lets experts specialise by domain.
Same model, data order and token budget for every method; seeds vary the initialisation and the data
order. Every run evaluates per-domain validation loss and the held-out routing (specialisation =
I(domain; expert) / H(domain), load imbalance = max/mean load, moe_train.analysis.routing).

    python experiments/global_lbl/run.py train --data data_cache/demo2k   # 6 runs, 22-62 min each on 2 shared cores
    python experiments/global_lbl/run.py plot                              # PNGs + the README table

Results go to experiments/global_lbl/results/<method>_s<seed>.json (a finished run is skipped when the
command is run again; `--seeds 1` and `--seeds 2` may run side by side); run directories to
experiments/global_lbl/runs/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from moe_train.analysis.routing import load_imbalance, specialisation
from moe_train.config import load_config
from moe_train.model.transformer import collect_moe_stats
from moe_train.train.trainer import Trainer

HERE = Path(__file__).parent
RESULTS = HERE / "results"

MODEL = [
    "model.hidden_size=128",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=32",
    "model.ffn_hidden_size=512",
    "model.vocab_size=2048",
    "moe.num_experts=8",
    "moe.top_k=2",
    "moe.expert_ffn_hidden_size=128",
    "moe.zloss_coeff=0.001",
    "train.seq_len=128",
    "train.global_batch_size=32",
    "train.micro_batch_size=2",  # 16 micro-batches of 2 sequences: micro-batch and global f differ
    "train.eval_batches=24",
    "optim.lr=3e-3",
    "optim.warmup_steps=20",
    "optim.schedule=cosine",
    "optim.grad_clip=1.0",
    "checkpoint.every=0",
    "log.tensorboard=false",
    "log.level=WARNING",
]
METHODS: dict[str, list[str]] = {
    "micro_batch": ["moe.lbl.coeff=0.01", "moe.lbl.scope=micro_batch"],
    "global": ["moe.lbl.coeff=0.01", "moe.lbl.scope=global", "moe.lbl.global_mode=exact"],
    "aux_free": ["moe.lbl.coeff=0", "moe.bias_update_rate=0.001"],
}


class ExperimentTrainer(Trainer):
    """A Trainer whose validation also records the held-out routing per (MoE layer, domain, expert)."""

    evals: list[dict[str, Any]]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.pmodel.train(False)
        losses: dict[str, float] = {}
        totals: dict[int, torch.Tensor] = {}
        domains = list(self.val_batches)
        for d, (domain, batches) in enumerate(self.val_batches.items()):
            loss = 0.0
            for batch in batches:
                out = self.model(batch.tokens_BS, batch.labels_BS)
                assert out.token_loss_BS is not None
                loss += out.token_loss_BS.mean().item()
                for layer_id, stats in collect_moe_stats(self.model).items():
                    counts = totals.setdefault(layer_id, torch.zeros(len(domains), stats.tokens_per_expert_E.numel()))
                    counts[d] += stats.tokens_per_expert_E
            losses[domain] = loss / len(batches)
        losses["all"] = sum(losses.values()) / len(domains)
        counts_LDE = torch.stack([totals[i] for i in sorted(totals)])
        self.evals.append(
            {
                "step": self.state.step,
                "val_loss": losses,
                "specialisation": [specialisation(c) for c in counts_LDE],
                "load_imbalance": [load_imbalance(c.sum(0)) for c in counts_LDE],
                "counts": counts_LDE.long().tolist(),
            }
        )
        return losses


def train_one(method: str, seed: int, data: str, steps: int, eval_every: int) -> dict[str, Any]:
    run_dir = HERE / "runs" / f"{method}_s{seed}"
    overrides = [
        *MODEL,
        *METHODS[method],
        f"data.dir={data}",
        f"train.seed={seed}",
        f"train.max_steps={steps}",
        f"train.eval_every={eval_every}",
        f"run.dir={run_dir}",
    ]
    if (run_dir / "checkpoints").exists():
        overrides.append("checkpoint.resume=latest")
    trainer = ExperimentTrainer(load_config(None, overrides))
    trainer.evals = []
    start = time.perf_counter()
    trainer.evaluate()  # step 0
    records = trainer.fit()
    keys = ("step", "loss", "lm_loss", "lbl", "routing_specialisation", "load_imbalance", "step_time_s")
    return {
        "method": method,
        "seed": seed,
        "overrides": overrides,
        "wall_s": time.perf_counter() - start,
        "train": [{k: r[k] for k in keys if k in r} | {"domain_loss": r["domain_loss"]} for r in records],
        "evals": trainer.evals,
    }


def train(args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        for method in args.methods:
            out = RESULTS / f"{method}_s{seed}.json"
            lock = out.with_suffix(".running")
            if out.exists() or lock.exists():  # done, or another process trains it (e.g. seeds in parallel)
                continue
            lock.touch()
            logging.warning("training %s seed %d", method, seed)
            result = train_one(method, seed, args.data, args.steps, args.eval_every)
            out.write_text(json.dumps(result))
            lock.unlink()
            logging.warning("%s seed %d done in %.0f s", method, seed, result["wall_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--data", default="data_cache/demo2k")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the cores are shared)")
    sub.add_parser("plot")
    args = parser.parse_args()
    if args.command == "train":
        train(args)
    else:
        from plot import plot_all  # experiments/global_lbl/plot.py

        plot_all(RESULTS, HERE)


if __name__ == "__main__":
    main()
