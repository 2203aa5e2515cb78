"""`moe-train inspect RUN_DIR`: the data mixture of a run over training, as a PNG (matplotlib Agg).

Reads <run_dir>/metrics.jsonl: per step the target weights of the global batch (mixture_target),
the realised fractions (mixture_realised) and the per-domain train losses (domain_loss); validation
records add per-domain validation losses. Writes <run_dir>/mixture.png (or `out`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_train.data.errors import DataError


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl (a half-written last line is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir} has no metrics.jsonl (is it a run directory?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def has_mixture_records(run_dir: Path) -> bool:
    """Whether run_dir is a run directory whose metrics.jsonl records the data mixture."""
    return (run_dir / "metrics.jsonl").is_file() and any("mixture_target" in r for r in read_metrics(run_dir))


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], dict[str, list[float]]]:
    rows = [r for r in records if key in r]
    names = list(rows[0][key]) if rows else []
    return [r["step"] for r in rows], {n: [r[key].get(n, float("nan")) for r in rows] for n in names}


def write_mixture_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plot target and realised weights and per-domain losses over training; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    steps, target = _series(records, "mixture_target")
    if not steps:
        raise DataError(f"{run_dir}/metrics.jsonl has no mixture_target records (trained before the mixture sampler)")
    _, realised = _series(records, "mixture_realised")
    loss_steps, losses = _series(records, "domain_loss")
    val_steps, val = _series(records, "val_loss")
    fig, (ax_w, ax_l) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for i, name in enumerate(target):
        ax_w.plot(steps, target[name], color=f"C{i}", label=name, lw=1.2)
        ax_w.plot(steps, realised[name], color=f"C{i}", lw=0.5, alpha=0.4)
        ax_l.plot(loss_steps, losses.get(name, []), color=f"C{i}", lw=0.6, alpha=0.6)
        if name in val:
            ax_l.plot(val_steps, val[name], "o-", color=f"C{i}", ms=3, label=f"{name} (val)")
    ax_w.set_ylabel("domain weight (thin: realised)")
    ax_w.set_ylim(0, 1)
    ax_w.legend(fontsize=8, ncol=4)
    ax_w.set_title(f"data mixture of {run_dir.name}")
    ax_l.set_ylabel("LM loss (lines: train, dots: val)")
    ax_l.set_xlabel("step")
    fig.tight_layout()
    path = Path(out) if out is not None else run_dir / "mixture.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
