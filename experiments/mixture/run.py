"""Stratified sampling vs online mixture policies (DoReMi, ODM, Aioli) at an equal token budget.

Every run trains the same small MoE on the built-in four-domain corpus (rebuilt with a 2048-entry
BPE so the model is cheap) for the same number of steps and global batch (equal tokens; Aioli's
probe steps are training steps and count in the budget, its extra validation passes do not). The
DoReMi reference of a seed is the stratified run of that seed (its last validation losses).

    .venv/bin/python experiments/mixture/run.py --work /tmp/mixture            # all runs, then plots
    .venv/bin/python experiments/mixture/run.py --work /tmp/mixture --policies odm --seeds 2   # one run
    .venv/bin/python experiments/mixture/run.py --work /tmp/mixture --plot-only

Results: <work>/results.json, the PNGs in experiments/mixture/, the markdown table of README.md on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEEDS = (1, 2, 3)
POLICIES = ("stratified", "doremi", "odm", "aioli")
MODEL = [
    "model.vocab_size=2048",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=16",
    "model.ffn_hidden_size=128",
    "moe.num_experts=4",
    "moe.top_k=2",
    "moe.expert_ffn_hidden_size=64",
    "train.max_steps=200",
    "train.global_batch_size=16",
    "train.micro_batch_size=16",
    "train.seq_len=128",
    "train.eval_every=100",
    "train.eval_batches=2",
    "train.log_every=50",
    "optim.warmup_steps=30",
    "checkpoint.every=0",
    "log.tensorboard=false",
]
POLICY_ARGS = {
    "stratified": ["data.mixture.policy=static"],
    "doremi": ["data.mixture.policy=doremi", "data.mixture.update_every=10", "data.mixture.min_weight=0.05"],
    "odm": ["data.mixture.policy=odm", "data.mixture.update_every=10", "data.mixture.min_weight=0.05"],
    "aioli": [
        "data.mixture.policy=aioli",
        "data.mixture.update_every=40",
        "data.mixture.aioli.probe_steps=2",
        "data.mixture.min_weight=0.05",
    ],
}


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "moe_train.cli", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=os.environ.copy())


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_one(work: Path, policy: str, seed: int) -> None:
    """One training run (skipped when finished); its summary goes to <run_dir>/summary.json."""
    data = work / "data"
    run_dir = work / f"{policy}_seed{seed}"
    args = [*MODEL, *POLICY_ARGS[policy], f"data.dir={data}", f"run.dir={run_dir}", f"train.seed={seed}"]
    if policy == "doremi":
        args.append(f"data.mixture.doremi.reference={work / f'stratified_seed{seed}' / 'metrics.jsonl'}")
    if not (run_dir / "summary.json").is_file():
        start = time.time()
        _cli("train", *args)
        print(f"{policy} seed {seed}: {time.time() - start:.0f} s", flush=True)
        (run_dir / "summary.json").write_text(json.dumps(summarize(run_dir) | {"wall_s": time.time() - start}))


def collect(work: Path) -> dict:
    """{policy_seedN: summary} of every run directory (finished or still running)."""
    results = {}
    for run_dir in sorted(work.glob("*_seed*")):
        if (run_dir / "metrics.jsonl").is_file():
            results[run_dir.name] = summarize(run_dir)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    return results


def val_at(run: dict, step: int | None) -> dict | None:
    """The validation losses of a run at `step` (None: its last validation)."""
    vals = [v for v in run["val"] if step is None or v["step"] == step]
    return vals[-1]["val_loss"] if vals else None


def summarize(run_dir: Path) -> dict:
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    train = [r for r in records if "lm_loss" in r]
    return {
        "val": [r for r in records if "val_loss" in r],
        "weights": [[r["step"], r.get("mixture_target", {})] for r in train],
        "seconds": sum(r["step_time_s"] for r in train),
        "tokens": train[-1]["tokens"],
    }


def _complete(results: dict, step: int | None) -> list[str]:
    return [p for p in POLICIES if all(val_at(results.get(f"{p}_seed{s}", {"val": []}), step) for s in SEEDS)]


def table(results: dict, step: int | None) -> str:
    import numpy as np

    policies = _complete(results, step)
    first = val_at(results[f"{policies[0]}_seed{SEEDS[0]}"], step)
    assert first is not None
    domains = [d for d in first if d != "all"]
    lines = ["| policy | " + " | ".join(domains) + " | average |", "|---" * (len(domains) + 2) + "|"]
    for policy in policies:
        finals = [val_at(results[f"{policy}_seed{s}"], step) for s in SEEDS]
        cells = []
        for key in [*domains, "all"]:
            vals = [f[key] for f in finals if f is not None]
            cells.append(f"{np.mean(vals):.3f} ({', '.join(f'{v:.3f}' for v in vals)})")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diff_table(results: dict, step: int | None) -> str:
    """Paired differences: validation loss of policy seed s minus stratified seed s, mean (per seed)."""
    import numpy as np

    policies = [p for p in _complete(results, step) if p != "stratified"]
    base = [val_at(results[f"stratified_seed{s}"], step) for s in SEEDS]
    assert all(b is not None for b in base)
    keys = list(base[0])  # type: ignore[arg-type]
    lines = ["| policy − stratified | " + " | ".join(k if k != "all" else "average" for k in keys) + " |"]
    lines.append("|---" * (len(keys) + 1) + "|")
    for policy in policies:
        finals = [val_at(results[f"{policy}_seed{s}"], step) for s in SEEDS]
        cells = []
        for key in keys:
            diffs = [f[key] - b[key] for f, b in zip(finals, base, strict=True)]  # type: ignore[index]
            cells.append(f"{np.mean(diffs):+.3f} ({', '.join(f'{v:+.3f}' for v in diffs)})")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, out: Path, step: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = _complete(results, step)
    online = [p for p in done if p != "stratified"]
    fig, axes = plt.subplots(len(SEEDS), len(online), figsize=(4 * len(online), 3 * len(SEEDS)), squeeze=False)
    for row, seed in enumerate(SEEDS):
        for col, policy in enumerate(online):
            ax = axes[row][col]
            weights = [w for w in results[f"{policy}_seed{seed}"]["weights"] if step is None or w[0] <= step]
            steps = [w[0] for w in weights]
            for domain in weights[0][1]:
                ax.plot(steps, [w[1][domain] for w in weights], label=domain, lw=0.8)
            ax.set_title(f"{policy}, seed {seed}")
            ax.set_ylim(0, 1)
            ax.set_xlabel("step")
    axes[0][0].set_ylabel("target weight of the batch")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "weights.png", dpi=110)
    plt.close(fig)

    _plot_val(results, out, step, done)


def _plot_val(results: dict, out: Path, step: int | None, done: list[str]) -> None:
    """Paired differences: policy seed s minus stratified seed s (the seeds share the initialisation);
    grey: stratified seed s minus the stratified mean, the seed-to-seed spread for scale."""
    import matplotlib.pyplot as plt
    import numpy as np

    def val(policy: str, seed: int) -> dict:
        losses = val_at(results[f"{policy}_seed{seed}"], step)
        assert losses is not None
        return losses

    domains = list(val("stratified", SEEDS[0]))
    base = {d: float(np.mean([val("stratified", s)[d] for s in SEEDS])) for d in domains}
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(done)
    for i, policy in enumerate(done):
        x = np.arange(len(domains)) + i * width - 0.4 + width / 2
        for seed_i, seed in enumerate(SEEDS):
            ref = {d: base[d] for d in domains} if policy == "stratified" else val("stratified", seed)
            label = None if seed_i else ("stratified: seed − mean" if policy == "stratified" else policy)
            color = "0.6" if policy == "stratified" else f"C{i}"
            ax.scatter(x, [val(policy, seed)[d] - ref[d] for d in domains], s=14, color=color, label=label)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(np.arange(len(domains)), domains)
    when = "last validation" if step is None else f"step {step}"
    ax.set_ylabel(f"val loss ({when}) minus\nstratified, same seed")
    ax.set_title("validation loss per domain and average ('all'), one dot per seed", fontsize=9)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/moe_train_mixture", help="data and run directories")
    parser.add_argument("--plot-only", action="store_true", help="collect finished runs and plot")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset to run")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds to run")
    parser.add_argument("--at-step", type=int, default=None, help="compare validation at this step (default: last)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        if not (work / "data" / "manifest.json").is_file():
            _cli("data", "build", "--out", str(work / "data"), "--vocab-size", "2048")
        for seed in map(int, args.seeds.split(",")):
            for policy in args.policies.split(","):
                run_one(work, policy, seed)
    results = collect(work)
    plot(results, HERE, args.at_step)
    print(table(results, args.at_step))
    print()
    print(diff_table(results, args.at_step))


if __name__ == "__main__":
    main()
