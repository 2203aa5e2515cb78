"""Rollback after a loss spike (`train.anomaly.on_spike: rollback`; arXiv 2503.05139, anomaly handling).

A spike can be the visible end of damage done by the steps before it. Rollback reloads the newest
checkpoint that verifies (step c, global sample lo) and marks the samples [lo, end of the spiking batch)
as never to be trained: those steps are replayed as skipped steps (their batches are handed out by the
sampler and dropped; the step counter and the LR schedule move on as in a clean run). The skipped range
is saved with every later checkpoint, so a restart skips it too. metrics.jsonl and ledger.jsonl are cut
back to step c and rewritten from there, so each step appears once. Every rank decides alike (the spike
verdict is on reduced values; the checkpoint choice is a deterministic look at the shared directory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_train.data.loader import TrainData
from moe_train.parallel.checkpoint_files import CheckpointError, load_file, resolve_resume
from moe_train.train.metrics import MetricsWriter
from moe_train.utils.logging import get_logger

if TYPE_CHECKING:
    from moe_train.train.trainer import Trainer

log = get_logger(__name__)


def roll_back(trainer: Trainer, step: int) -> bool:
    """Reload the newest checkpoint and skip from it through the batch of 0-based `step`; False (and the
    spiking step is only skipped) when there is no checkpoint to go back to."""
    cfg = trainer.cfg
    try:
        path = resolve_resume(
            trainer.run_dir, "latest", cfg.checkpoint.verify, trainer.groups.rank, trainer.groups.world_size
        )
    except CheckpointError:
        path = None
    if path is None:
        log.warning("step %d: spike but no checkpoint to roll back to; skipping the step only", step + 1)
        return False
    state = load_file(path / "trainer.pt")["train_state"]
    lo, hi = int(state["consumed_samples"]), trainer.state.consumed_samples + cfg.train.global_batch_size
    kept = trainer.anomaly.state_dict()
    kept["skip_ranges"].append([lo, hi])
    trainer.data.close()
    trainer.metrics.close()
    trainer._restore(path)
    trainer.anomaly.load_state_dict(kept)
    trainer.data = TrainData(cfg, trainer.groups.dp_rank, trainer.groups.dp_size, trainer.source)
    ledger_dir = trainer.run_dir if trainer.is_main else None
    trainer.data.start(trainer.state.step, trainer.state.consumed_samples, trainer._data_state, ledger_dir)
    trainer.metrics = MetricsWriter(
        trainer.run_dir, cfg.log.tensorboard, resume_step=trainer.state.step, enabled=trainer.is_main
    )
    log.warning(
        "step %d: loss spike; rolled back to %s and skipping global samples [%d, %d) (steps %d-%d)",
        step + 1,
        path,
        lo,
        hi,
        trainer.state.step + 1,
        step + 1,
    )
    return True
