"""Training anomalies: NaN/Inf in the loss or gradients, and loss spikes (after arXiv 2503.05139, §
anomaly handling).

The decision of a step is taken on values every rank already shares: the loss reduced over the
data-parallel replicas and the global gradient norm (all-reduced by clipping). So every rank skips,
stops or continues alike, with no extra collective.

- NaN/Inf loss or gradient norm: `train.anomaly.on_nan` 'skip' (the step trains nothing) or 'stop'.
- Spike: loss > mean + spike_zscore * std of the last `window` accepted losses (once the window is
  full); 'skip' the step. Only upward spikes count (a falling loss is progress).
- A skipped step: the optimizer does not step (its moments and step count stay), gradients are
  dropped, the expert bias and the streaming LBL state are not updated and the mixture policy does not
  see its losses; the step counter and the data position advance (the batch is consumed), so the LR
  schedule stays that of a clean run. The samples are logged to `<run.dir>/anomalies.jsonl`.
- Spike with `on_spike: rollback` (moe_train.train.rollback): reload the newest checkpoint and never train
  on the samples from there to the end of the spiking batch.
- More than `max_consecutive` anomalies in a row: AnomalyError naming the step, domains and sample ids.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_train.config import AnomalyConfig
from moe_train.utils.logging import get_logger

if TYPE_CHECKING:
    from moe_train.train.trainer import StepResult, Trainer

log = get_logger(__name__)

ANOMALY_LOG = "anomalies.jsonl"
ANOMALY_STATE = "anomaly_state"
"""Name of the guard's state saved with every checkpoint (`anomaly_state.json`)."""


class AnomalyError(RuntimeError):
    """Training stopped on anomalies; the message names the step and the data."""


@dataclass
class Verdict:
    """What to do with a step."""

    kind: str | None
    """None (a clean step), 'nan' or 'spike'."""
    detail: str = ""


class AnomalyGuard:
    """Per-run anomaly state: the loss window, counters, the run of consecutive anomalies."""

    def __init__(self, cfg: AnomalyConfig) -> None:
        self.cfg = cfg
        self.window: deque[float] = deque(maxlen=cfg.window)
        self.counts = {"nan": 0, "spike": 0}
        self.consecutive = 0
        self.skip_ranges: list[tuple[int, int]] = []
        """Global sample ranges [lo, hi) that a rollback decided never to train on."""

    def judge(self, loss: float, grad_norm: float) -> Verdict:
        """Classify a step from its reduced loss and global gradient norm (equal on every rank)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Verdict("nan", f"loss {loss}, grad norm {grad_norm}")
        z = self.cfg.spike_zscore
        if z > 0 and len(self.window) == self.window.maxlen:
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / len(self.window))
            score = (loss - mean) / max(std, 1e-12)
            if score > z:
                return Verdict("spike", f"loss {loss:.4f} is {score:.1f} std above the window mean {mean:.4f}")
        return Verdict(None)

    def record(self, verdict: Verdict, loss: float) -> None:
        """Count the verdict; a clean loss enters the window."""
        if verdict.kind is None:
            self.consecutive = 0
            self.window.append(loss)
            return
        self.counts[verdict.kind] += 1
        self.consecutive += 1

    def must_stop(self, verdict: Verdict) -> bool:
        """Whether the run stops here (on_nan=stop, or too many anomalies in a row)."""
        if (verdict.kind, "stop") in (("nan", self.cfg.on_nan), ("spike", self.cfg.on_spike)):
            return True
        return verdict.kind is not None and self.consecutive > self.cfg.max_consecutive

    def drops(self, first_sample: int) -> bool:
        """Whether the batch starting at global sample `first_sample` lies in a rolled-back range."""
        return any(lo <= first_sample < hi for lo, hi in self.skip_ranges)

    def metrics(self, skipped: bool) -> dict[str, Any]:
        """Counters for metrics.jsonl / TensorBoard."""
        return {"skipped": int(skipped), "anomaly_nan": self.counts["nan"], "anomaly_spike": self.counts["spike"]}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state saved with checkpoints (a resumed run decides as the uninterrupted one)."""
        return {
            "window": list(self.window),
            "counts": dict(self.counts),
            "consecutive": self.consecutive,
            "skip_ranges": [list(r) for r in self.skip_ranges],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict()."""
        self.window.extend(float(x) for x in state["window"])
        self.counts.update({k: int(v) for k, v in state["counts"].items()})
        self.consecutive = int(state["consecutive"])
        self.skip_ranges = [(int(lo), int(hi)) for lo, hi in state.get("skip_ranges", [])]


def describe_samples(domains: list[str], domain_G: list[int], sample_G: list[int], limit: int = 16) -> str:
    """'domain code: samples 3, 17; domain web: samples 8' for a batch (the first `limit` samples)."""
    by_domain: dict[str, list[int]] = {}
    for d, s in list(zip(domain_G, sample_G, strict=True))[:limit]:
        by_domain.setdefault(domains[d], []).append(s)
    more = f" (+{len(domain_G) - limit} more)" if len(domain_G) > limit else ""
    return "; ".join(f"domain {d}: samples {', '.join(map(str, s))}" for d, s in by_domain.items()) + more


def log_anomaly(run_dir: Path, step: int, verdict: Verdict, action: str, samples: dict[str, Any]) -> None:
    """Append one line to <run.dir>/anomalies.jsonl (rank 0) and warn."""
    entry = {"step": step, "kind": verdict.kind, "detail": verdict.detail, "action": action, **samples}
    with (run_dir / ANOMALY_LOG).open("a") as f:
        f.write(json.dumps(entry) + "\n")
    log.warning("step %d: %s (%s): %s", step, verdict.kind, verdict.detail, action)


def screen_step(trainer: Trainer, step: int, result: StepResult) -> str | None:
    """Judge the step the trainer just computed (0-based `step`): None (train it), 'skip' or 'rollback'.

    Raises AnomalyError when the run must stop. Rank 0 logs every anomaly to anomalies.jsonl."""
    guard = trainer.anomaly
    verdict = guard.judge(result.loss, result.grad_norm)
    guard.record(verdict, result.loss)
    if verdict.kind is None:
        return None
    plan = trainer.data.current
    domain_G = plan.domain_G.tolist() if plan is not None else []
    sample_G = plan.sample_G.tolist() if plan is not None else []
    data = describe_samples(trainer.source.domains, domain_G, sample_G)
    stop = guard.must_stop(verdict)
    action = "rollback" if verdict.kind == "spike" and guard.cfg.on_spike == "rollback" else "skip"
    if trainer.is_main:
        samples = {"domains": sorted({trainer.source.domains[d] for d in domain_G}), "samples": sample_G}
        log_anomaly(trainer.run_dir, step + 1, verdict, "stop" if stop else action, samples)
    if stop:
        raise AnomalyError(
            f"training stopped at step {step + 1}: {verdict.kind} ({verdict.detail}), {guard.consecutive} anomalous"
            f" step(s) in a row (train.anomaly.on_nan={guard.cfg.on_nan}, on_spike={guard.cfg.on_spike},"
            f" max_consecutive={guard.cfg.max_consecutive}); data: {data}"
        )
    return action
