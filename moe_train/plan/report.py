"""What `moe-train plan` prints and writes: a ranked table with memory and time breakdowns, JSON for
tools, a PNG chart of the breakdowns, and the chosen layout as a config `moe-train train` accepts."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from moe_train.config import Config, to_dict
from moe_train.plan.cluster import GB, Cluster
from moe_train.plan.search import Candidate
from moe_train.plan.space import PlanOptions, layout_config

MEMORY_TERMS = ("weights", "grads", "master", "optimizer", "activations", "logits", "dispatch", "recompute")
TIME_TERMS = ("compute", "recompute", "tp_comm", "ep_comm", "cp_comm", "pp_p2p", "bubble", "dp_comm", "optimizer")


def _timed(c: Candidate) -> dict[str, float]:
    assert c.time is not None, "a ranked candidate is always timed"
    return {k: float(v) for k, v in c.time.as_dict().items() if isinstance(v, (int, float))}


def format_table(cands: list[Candidate], cluster: Cluster, world: int, evaluated: int) -> str:
    """Ranked layouts: throughput, MFU, peak memory, then each one's memory and time breakdowns."""
    head = f"{'#':>2}  {'layout':<40} {'tokens/s':>12} {'MFU':>6} {'TFLOP/s':>8} {'step s':>8} {'mem GB':>7}"
    lines = [
        f"{evaluated} layouts evaluated on {world} x {cluster.name} "
        f"({cluster.usable_bytes / GB:.0f} GB usable per GPU); best {len(cands)}:",
        head,
    ]
    for i, c in enumerate(cands, 1):
        t = _timed(c)
        lines.append(
            f"{i:>2}  {c.layout.label():<40} {t['tokens_per_s']:>12,.0f} {t['mfu']:>6.1%} "
            f"{t['tflops_per_gpu']:>8.0f} {t['step']:>8.3f} {c.memory.total / GB:>7.1f}"
        )
    for i, c in enumerate(cands, 1):
        t, m = _timed(c), c.memory.as_dict()
        mem = " ".join(f"{k} {m[k] / GB:.1f}" for k in MEMORY_TERMS if m[k])
        tim = " ".join(f"{k} {t[k]:.3f}" for k in TIME_TERMS if t[k])
        split = f" split {list(c.layout.pp_layer_split)}" if c.layout.pp_layer_split else ""
        lines.append(f"#{i} memory GB (pp rank {c.memory.pp_rank}): {mem}{split}")
        lines.append(f"#{i} time s/step: {tim}")
    return "\n".join(lines)


def to_json(cands: list[Candidate], cluster: Cluster, world: int, options: PlanOptions, evaluated: int) -> str:
    """Machine-readable plan: the inputs and every ranked candidate with its breakdowns."""
    doc = {
        "cluster": cluster.name,
        "gpus": world,
        "seq_len": options.seq_len,
        "global_batch_size": options.global_batch_size,
        "evaluated": evaluated,
        "candidates": [c.as_dict() for c in cands],
    }
    return json.dumps(doc, indent=2, default=list)


def layout_overrides(cfg: Config, cand: Candidate, options: PlanOptions) -> list[str]:
    """Dotted overrides that turn `cfg` into the candidate's layout (what `moe-train train` takes)."""
    trial = layout_config(cfg, cand.layout, options)
    p, t = trial.parallel, trial.train
    out = [f"parallel.{k}={getattr(p, k)}" for k in ("tp", "pp", "vpp", "ep", "etp", "pp_schedule")]
    out.append(f"parallel.zero1={str(p.zero1).lower()}")
    if p.pp_layer_split is not None:
        out.append("parallel.pp_layer_split=[" + ",".join(map(str, p.pp_layer_split)) + "]")
    out.append(f"parallel.cp={p.cp}")
    keys = ("micro_batch_size", "seq_len", "global_batch_size", "recompute", "loss_chunk_tokens")
    out += [f"train.{k}={getattr(t, k)}" for k in keys]
    return out


def write_config(cfg: Config, cand: Candidate, options: PlanOptions, path: Path) -> None:
    """The full config with the candidate's layout applied, as YAML; refuses to overwrite."""
    if path.exists():
        raise FileExistsError(f"{path} already exists (choose a new path for --write-config)")
    text = yaml.safe_dump(to_dict(layout_config(cfg, cand.layout, options)), sort_keys=False)
    path.write_text(f"# written by moe-train plan: {cand.layout.label()}\n{text}")


def write_chart(cands: list[Candidate], cluster: Cluster, path: Path) -> None:
    """PNG: per candidate, the step-time breakdown and the peak-memory breakdown as stacked bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"#{i} {c.layout.label()}" for i, c in enumerate(cands, 1)]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(14, 2.2 + 0.6 * len(cands)))
    for ax, terms, values, unit in (
        (ax_t, TIME_TERMS, [_timed(c) for c in cands], "seconds per step"),
        (ax_m, MEMORY_TERMS, [{k: v / GB for k, v in c.memory.as_dict().items()} for c in cands], "GB (peak rank)"),
    ):
        left = [0.0] * len(cands)
        for term in terms:
            widths = [float(v[term]) for v in values]
            if any(widths):
                ax.barh(labels, widths, left=left, label=term)
                left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.set_xlabel(unit)
        ax.invert_yaxis()
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.6 / len(cands)), ncol=5)
    ax_m.axvline(cluster.usable_bytes / GB, color="k", linestyle="--", linewidth=1)
    ax_m.set_yticklabels([])
    fig.suptitle(f"moe-train plan on {cluster.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
