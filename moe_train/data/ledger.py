"""The sample ledger: `<run.dir>/ledger.jsonl`, one line per sample of every global batch (rank 0).

Each line: {"step": optimizer step that trained it (1-based, as in metrics.jsonl), "index": global
sample index, "domain": name, "sample": packed sample id within its domain, "epoch": that domain's
epoch}. Lines are appended when a batch is handed to the model and flushed per step; on resume every
line of a step after the checkpoint is dropped first, so the file lists each trained step once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from moe_train.data.sampler import BatchPlan

LEDGER_NAME = "ledger.jsonl"


def truncate_after(path: Path, step: int) -> None:
    """Keep only lines of steps <= step (and drop a half-written last line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in kept))


class Ledger:
    """Appends the plan of every trained global batch to ledger.jsonl."""

    def __init__(self, run_dir: Path, resume_step: int, domains: list[str]) -> None:
        self.path = run_dir / LEDGER_NAME
        self.domains = domains
        truncate_after(self.path, resume_step)
        self._fh: IO[str] | None = self.path.open("a")

    def write(self, plan: BatchPlan) -> None:
        """The lines of the batch at plan.step (trained by optimizer step plan.step + 1)."""
        assert self._fh is not None
        step = plan.step + 1
        lines = [
            json.dumps(
                {
                    "step": step,
                    "index": plan.first_index + i,
                    "domain": self.domains[d],
                    "sample": int(s),
                    "epoch": int(e),
                }
            )
            for i, (d, s, e) in enumerate(
                zip(plan.domain_G.tolist(), plan.sample_G.tolist(), plan.epoch_G.tolist(), strict=True)
            )
        ]
        self._fh.write("\n".join(lines) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
