"""Expert-specialisation analytics: domain x expert routing counts, scores, heatmaps.

Legend: L MoE layers, D domains, E experts.

* **Specialisation** of a layer: the mutual information between a routed assignment's domain and its
  expert, normalised by the domain entropy, I(D; X) / H(D) = 1 - H(D | X) / H(D), from the counts_DE of
  all assignments (a token contributes its k choices). 1 when every expert serves a single domain,
  0 when the expert choice says nothing about the domain (e.g. a uniform router). Normalising by H(D)
  rather than by sqrt(H(D) H(X)) keeps the maximum at 1 whatever k and the number of experts a domain
  spreads over, so layers and runs compare directly. The plug-in estimate is biased upwards by about
  (D-1)(E-1) / (2 n ln 2 H(D)) for n assignments (~1e-3 for the demo's held-out sets).
* **Load imbalance** of a layer: max over experts of the load / mean load (1 balanced, E collapsed).

Used by the trainer (per-step counts of the training batches), `moe-train inspect RUN_DIR`
(held-out sets through a saved model, moe_train.analysis.inspect) and experiments/global_lbl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_train.data import Batch
from moe_train.model.transformer import collect_moe_stats


def specialisation(counts_DE: torch.Tensor) -> float:
    """I(domain; expert) / H(domain) of the assignments counted in counts_DE (0 when H(domain) is 0)."""
    joint_DE = counts_DE.double() / counts_DE.sum().clamp(min=1)
    p_D, p_E = joint_DE.sum(1), joint_DE.sum(0)
    h_domain = -(p_D[p_D > 0] * p_D[p_D > 0].log()).sum()
    if float(h_domain) <= 0:
        return 0.0
    outer_DE = p_D[:, None] * p_E[None, :]
    nz = joint_DE > 0
    mutual = (joint_DE[nz] * (joint_DE[nz] / outer_DE[nz]).log()).sum()
    return float((mutual / h_domain).clamp(0.0, 1.0))


def load_imbalance(counts_E: torch.Tensor) -> float:
    """max_i load_i / mean load (1 = balanced); 0 for no tokens."""
    load_E = counts_E.double()
    mean = float(load_E.mean())
    return float(load_E.max()) / mean if mean > 0 else 0.0


def domain_shares(counts_DE: torch.Tensor) -> torch.Tensor:
    """shares_DE: each domain's assignments split over the experts (rows sum to 1; empty rows 0)."""
    counts = counts_DE.double()
    return counts / counts.sum(1, keepdim=True).clamp(min=1)


def routing_summary(counts_LDE: torch.Tensor | None) -> dict[str, float]:
    """Per-step record entries: specialisation and load imbalance, averaged over MoE layers."""
    if counts_LDE is None or counts_LDE.numel() == 0:
        return {}
    spec = [specialisation(c) for c in counts_LDE]
    imb = [load_imbalance(c.sum(0)) for c in counts_LDE]
    return {"routing_specialisation": sum(spec) / len(spec), "load_imbalance": sum(imb) / len(imb)}


@torch.no_grad()
def domain_expert_counts(
    model: nn.Module, batches: dict[str, list[Batch]], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, list[int]]:
    """(counts_LDE, MoE layer ids): routed assignments per layer, domain (in `batches` order) and
    expert, from a no-grad forward of every batch of every domain through a single-process model."""
    was_training = model.training
    model.train(False)
    totals: dict[int, torch.Tensor] = {}
    domains = list(batches)
    try:
        for d, name in enumerate(domains):
            for batch in batches[name]:
                model(batch.tokens_BS.to(device))
                for layer_id, stats in collect_moe_stats(model).items():
                    counts_E = stats.tokens_per_expert_E.cpu()
                    if layer_id not in totals:
                        totals[layer_id] = torch.zeros(len(domains), counts_E.numel(), dtype=torch.long)
                    totals[layer_id][d] += counts_E
    finally:
        model.train(was_training)
    layer_ids = sorted(totals)
    if not layer_ids:
        return torch.zeros(0, len(domains), 0, dtype=torch.long), []
    return torch.stack([totals[i] for i in layer_ids]), layer_ids


def layer_report(counts_LDE: torch.Tensor, domains: list[str], layer_ids: list[int]) -> dict[str, Any]:
    """The numbers of a routing analysis (what `write_report` saves as JSON)."""
    layers = []
    for layer_id, counts_DE in zip(layer_ids, counts_LDE, strict=True):
        layers.append(
            {
                "layer": layer_id,
                "specialisation": specialisation(counts_DE),
                "load_imbalance": load_imbalance(counts_DE.sum(0)),
                "domain_load_imbalance": {d: load_imbalance(c) for d, c in zip(domains, counts_DE, strict=True)},
                "shares": {d: s.tolist() for d, s in zip(domains, domain_shares(counts_DE), strict=True)},
                "counts": {d: c.tolist() for d, c in zip(domains, counts_DE, strict=True)},
            }
        )
    summary = routing_summary(counts_LDE)
    return {"domains": domains, "layers": layers, **summary}


def heatmap_figure(counts_DE: torch.Tensor, domains: list[str], title: str) -> Any:
    """A matplotlib figure: domain x expert token shares (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = domain_shares(counts_DE).numpy()
    num_experts = shares.shape[1]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * num_experts + 2), 0.5 * len(domains) + 1.5))
    image = ax.imshow(shares, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(float(shares.max()), 1e-9))
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(len(domains)), labels=domains)
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of the domain's assignments")
    fig.tight_layout()
    return fig


def write_report(counts_LDE: torch.Tensor, domains: list[str], layer_ids: list[int], out_dir: Path) -> dict:
    """Per layer a PNG heatmap (layer_<id>.png) and one routing.json; returns the JSON's content."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    report = layer_report(counts_LDE, domains, layer_ids)
    for entry, counts_DE in zip(report["layers"], counts_LDE, strict=True):
        title = (
            f"layer {entry['layer']}: specialisation {entry['specialisation']:.3f}, "
            f"imbalance {entry['load_imbalance']:.2f}"
        )
        fig = heatmap_figure(counts_DE, domains, title)
        fig.savefig(out_dir / f"layer_{entry['layer']:02d}.png", dpi=110)
        plt.close(fig)
    (out_dir / "routing.json").write_text(json.dumps(report, indent=2))
    return report


def write_tensorboard(tb: Any, step: int, counts_LDE: torch.Tensor, domains: list[str], images: bool) -> None:
    """Per-layer specialisation / imbalance scalars and per-domain load histograms; heatmaps if `images`."""
    import matplotlib.pyplot as plt

    for layer, counts_DE in enumerate(counts_LDE):
        tb.add_scalar(f"routing/layer{layer}_specialisation", specialisation(counts_DE), step)
        for d, name in enumerate(domains):
            if int(counts_DE[d].sum()) > 0:
                tb.add_histogram(f"routing_domain/layer{layer}_{name}", domain_shares(counts_DE)[d], step)
        if images:
            fig = heatmap_figure(counts_DE, domains, f"MoE layer {layer}, step {step}")
            tb.add_figure(f"routing/layer{layer}_domain_expert", fig, step)
            plt.close(fig)
