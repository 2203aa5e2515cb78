"""Plots and the README table of experiments/global_lbl (called by `run.py plot`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from moe_train.analysis.routing import domain_shares  # noqa: E402

COLORS = {"micro_batch": "tab:red", "global": "tab:blue", "aux_free": "tab:green"}
LABELS = {"micro_batch": "micro-batch LBL", "global": "global-batch LBL (exact)", "aux_free": "aux-loss-free bias"}


def load(results: Path) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(results.glob("*.json")):
        run = json.loads(path.read_text())
        runs.setdefault(run["method"], []).append(run)
    return {m: runs[m] for m in COLORS if m in runs}


def _series(run: dict, key: Any) -> tuple[list[int], list[float]]:
    evals = run["evals"]
    return [e["step"] for e in evals], [key(e) for e in evals]


def _curves(ax: Any, runs: dict, key: Any, ylabel: str) -> None:
    for method, seeds in runs.items():
        for i, run in enumerate(seeds):
            steps, values = _series(run, key)
            ax.plot(steps, values, color=COLORS[method], alpha=0.9, lw=1.2, ls="-" if i == 0 else "--",
                    label=f"{LABELS[method]} (seed {run['seed']})")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def plot_curves(runs: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    _curves(axes[0], runs, lambda e: e["val_loss"]["all"], "validation loss (mean over domains)")
    axes[0].set_ylim(top=min(6.0, axes[0].get_ylim()[1]))
    _curves(axes[1], runs, lambda e: _mean(e["specialisation"]), "specialisation I(domain; expert)/H(domain)")
    _curves(axes[2], runs, lambda e: _mean(e["load_imbalance"]), "load imbalance max/mean (held-out)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def plot_domains(runs: dict, out: Path) -> None:
    domains = [d for d in next(iter(runs.values()))[0]["evals"][0]["val_loss"] if d != "all"]
    fig, axes = plt.subplots(1, len(domains), figsize=(4 * len(domains), 3.6))
    for ax, domain in zip(axes, domains, strict=True):
        _curves(ax, runs, lambda e, d=domain: e["val_loss"][d], f"val loss: {domain}")
        steps = [e["step"] for e in next(iter(runs.values()))[0]["evals"]]
        ax.set_xlim(steps[len(steps) // 3], steps[-1])  # the later part, where the curves could separate
        ax.autoscale(axis="y")
        lo = min(
            min(_series(r, lambda e, d=domain: e["val_loss"][d])[1][len(steps) // 3 :])
            for s in runs.values()
            for r in s
        )
        hi = max(
            max(_series(r, lambda e, d=domain: e["val_loss"][d])[1][len(steps) // 3 :])
            for s in runs.values()
            for r in s
        )
        ax.set_ylim(lo - 0.02, hi + 0.02)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "domain_val_loss.png", dpi=110)
    plt.close(fig)


def plot_heatmaps(runs: dict, out: Path) -> None:
    """Final held-out domain x expert shares, every MoE layer (rows) of each method (columns), seed 1."""
    methods = list(runs)
    first = runs[methods[0]][0]["evals"][-1]
    domains = [d for d in first["val_loss"] if d != "all"]
    num_layers = len(first["counts"])
    fig, axes = plt.subplots(num_layers, len(methods), figsize=(4.2 * len(methods), 1.9 * num_layers), squeeze=False)
    for j, method in enumerate(methods):
        last = runs[method][0]["evals"][-1]
        for i in range(num_layers):
            ax = axes[i][j]
            shares = domain_shares(torch.tensor(last["counts"][i])).numpy()
            image = ax.imshow(shares, cmap="viridis", aspect="auto", vmin=0, vmax=0.6)
            ax.set_yticks(range(len(domains)), labels=domains, fontsize=7)
            ax.set_xticks(range(shares.shape[1]))
            ax.tick_params(labelsize=7)
            ax.set_title(f"{LABELS[method]}, layer {i}: spec {last['specialisation'][i]:.3f}", fontsize=8)
        axes[-1][j].set_xlabel("expert", fontsize=8)
    fig.tight_layout()
    fig.colorbar(image, ax=axes, shrink=0.6, label="share of the domain's assignments")
    fig.savefig(out / "heatmaps.png", dpi=110)
    plt.close(fig)


def table(runs: dict) -> str:
    """Markdown: final numbers per method, mean over seeds with the per-seed values."""
    domains = [d for d in next(iter(runs.values()))[0]["evals"][-1]["val_loss"] if d != "all"]
    head = ["method", "val loss (all)", *[f"val {d}" for d in domains], "specialisation", "imbalance"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, seeds in runs.items():
        lasts = [r["evals"][-1] for r in seeds]

        def cell(values: list[float], digits: int = 3) -> str:
            spread = f" ({', '.join(f'{v:.{digits}f}' for v in values)})" if len(values) > 1 else ""
            return f"{statistics.mean(values):.{digits}f}{spread}"

        row = [LABELS[method], cell([e["val_loss"]["all"] for e in lasts])]
        row += [cell([e["val_loss"][d] for e in lasts]) for d in domains]
        row += [cell([_mean(e["specialisation"]) for e in lasts]), cell([_mean(e["load_imbalance"]) for e in lasts], 2)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_all(results: Path, out: Path) -> None:
    runs = load(results)
    if not runs:
        raise SystemExit(f"no results in {results}")
    plot_curves(runs, out)
    plot_domains(runs, out)
    plot_heatmaps(runs, out)
    print(table(runs))
