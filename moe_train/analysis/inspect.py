"""`moe-train inspect RUN_DIR_OR_CHECKPOINT`: the held-out sets through a saved model, routing per domain.

Loads the checkpoint (a run directory means its newest one) into a single-process model built from
the checkpoint's own config (dotted overrides apply on top, e.g. `data.dir=...` when the data moved,
`train.eval_batches=16` for a larger sample), runs every domain's validation batches through it and
writes, per MoE layer, a PNG heatmap of the domain x expert token shares plus `routing.json` with the
specialisation score and load imbalance of each layer (moe_train.analysis.routing).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from moe_train.analysis.routing import domain_expert_counts, write_report
from moe_train.config import Config, apply_overrides, from_dict
from moe_train.data import build_val_batches, validate_data
from moe_train.model import build_model
from moe_train.parallel.dist_checkpoint import is_distributed_checkpoint, load_distributed_checkpoint
from moe_train.parallel.groups import ProcessGroups
from moe_train.train.checkpoint import CheckpointError, list_checkpoints

log = logging.getLogger(__name__)


def resolve_checkpoint(target: str | Path) -> Path:
    """A checkpoint directory, or the newest checkpoint of a run directory; CheckpointError otherwise."""
    path = Path(target)
    if is_distributed_checkpoint(path):
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} is neither a run directory nor a checkpoint directory")
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path} holds no checkpoint (expected {path / 'checkpoints'}/step_NNNNNNNN)")
    return found[-1]


def checkpoint_config(checkpoint: Path, overrides: list[str]) -> Config:
    """The config a checkpoint was saved with, dotted overrides applied, for one process."""
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} has no config.json")
    values: dict[str, Any] = json.loads(config_path.read_text())
    values.pop("parallel", None)  # analysed in one process whatever the training layout was
    return from_dict(apply_overrides(values, overrides))


def inspect_routing(target: str | Path, overrides: list[str], out: str | Path | None = None) -> tuple[Path, dict]:
    """Analyse a saved model's routing on the held-out sets; returns (output directory, report).

    The output goes to `out`, default <run dir>/inspect/<checkpoint name>/ (rewritten when run again)."""
    checkpoint = resolve_checkpoint(target)
    cfg = checkpoint_config(checkpoint, overrides)
    validate_data(cfg)
    batches = build_val_batches(cfg)
    model = build_model(cfg, initialise=False)  # the checkpoint fills every tensor (or loading fails)
    load_distributed_checkpoint(checkpoint, model, None, ProcessGroups.single())
    counts_LDE, layer_ids = domain_expert_counts(model, batches)
    out_dir = Path(out) if out is not None else checkpoint.parent.parent / "inspect" / checkpoint.name
    report = write_report(counts_LDE, list(batches), layer_ids, out_dir)
    report["checkpoint"] = str(checkpoint)
    (out_dir / "routing.json").write_text(json.dumps(report, indent=2))
    return out_dir, report


def format_report(out_dir: Path, report: dict) -> str:
    """Console lines: one per MoE layer, then where the files are."""
    lines = [f"routing of {report['checkpoint']} on the held-out sets ({', '.join(report['domains'])}):"]
    for entry in report["layers"]:
        lines.append(
            f"  layer {entry['layer']:>3}: specialisation {entry['specialisation']:.3f}"
            f"  load imbalance (max/mean) {entry['load_imbalance']:.2f}"
        )
    if report["layers"]:
        lines.append(
            f"  mean     : specialisation {report['routing_specialisation']:.3f}"
            f"  load imbalance (max/mean) {report['load_imbalance']:.2f}"
        )
    lines.append(f"wrote {len(report['layers'])} heatmaps and routing.json to {out_dir}")
    return "\n".join(lines)
