"""TrainData: what the trainer calls for data — source + mixture sampler + policy + prefetch + ledger.

One global batch is planned ahead: when the trainer takes the batch of step s, the plan of step s+1
is made with the policy's weights at that moment and its tokens are read in a background thread
while step s runs. So the losses of step s change the mixture from step s+2 on (a fixed lag of one
step, the same with prefetch on or off). The checkpointed data state is the sampler state before that
planned-ahead batch plus the weights it was planned with, and the policy state: a resumed run plans
the same batch again, under any data-parallel layout and even another global batch size.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_train.config import Config
from moe_train.data.errors import DataError
from moe_train.data.ledger import Ledger
from moe_train.data.policies import MixturePolicy, build_policy
from moe_train.data.sampler import BatchPlan, MixtureSampler
from moe_train.data.source import Batch, TrainSource, build_train_source

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class _Pending:
    """The planned-ahead batch: its plan (or the error planning raised) and this rank's tokens."""

    sampler_before: dict[str, Any]
    weights_D: np.ndarray
    plan: BatchPlan | None = None
    error: DataError | None = None
    batches: Future[list[Batch]] | list[Batch] | None = None


class TrainData:
    """Per-rank training data: this DP replica's micro-batches of every global batch, in order."""

    def __init__(self, cfg: Config, dp_rank: int = 0, dp_size: int = 1, source: TrainSource | None = None) -> None:
        self.cfg = cfg
        self.source = source or build_train_source(cfg)
        self.domains = self.source.domains
        mix = cfg.data.mixture
        counts = [self.source.num_samples(d) for d in range(len(self.domains))]
        self.sampler = MixtureSampler(self.domains, counts, cfg.train.seed, mix.max_epochs, mix.on_exhausted)
        self.policy: MixturePolicy = build_policy(self.domains, cfg.data.domain_weights, mix, cfg.train.seed)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="moe-data") if cfg.data.prefetch else None
        self._pending: _Pending | None = None
        self.current: BatchPlan | None = None
        self.ledger: Ledger | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, step: int, consumed: int, state: dict[str, Any] | None, ledger_dir: Path | None) -> None:
        """Position at `step` / `consumed` samples (from a checkpoint's data state if any) and plan ahead."""
        weights = None
        if state is not None:
            self.load_state_dict(state)
            weights = np.asarray(state["pending_weights"], dtype=np.float64)
        elif consumed > 0:
            self._replay(consumed)
        if (self.sampler.step, self.sampler.next_index) != (step, consumed):
            raise DataError(
                f"data state is at step {self.sampler.step} / sample {self.sampler.next_index}, the checkpoint at "
                f"step {step} / sample {consumed}"
            )
        if ledger_dir is not None and self.cfg.data.ledger:
            self.ledger = Ledger(ledger_dir, step, self.domains)
        self._plan_ahead(self.policy.weights_for(step) if weights is None else weights)

    def _replay(self, consumed: int) -> None:
        """No data state in the checkpoint: re-plan from step 0 (only for policies that ignore losses)."""
        if self.policy.uses_losses or self.policy.name == "aioli":
            raise DataError(f"the checkpoint has no data state, which data.mixture.policy={self.policy.name} needs")
        size = self.cfg.train.global_batch_size
        log.warning("checkpoint has no data state: replaying the sampler for %d samples", consumed)
        while self.sampler.next_index < consumed:
            self.sampler.plan(self.policy.weights_for(self.sampler.step), size)

    def close(self) -> None:
        """Stop the prefetch thread and close the ledger."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None

    # -- batches ------------------------------------------------------------------------------

    def _read(self, plan: BatchPlan) -> list[Batch]:
        """This replica's slice of the global batch, as micro-batches."""
        t = self.cfg.train
        per_replica = plan.size // self.dp_size
        lo = self.dp_rank * per_replica
        pairs = list(
            zip(
                plan.domain_G[lo : lo + per_replica].tolist(),
                plan.sample_G[lo : lo + per_replica].tolist(),
                strict=True,
            )
        )
        mbs = t.micro_batch_size
        return [self.source.batch(pairs[i : i + mbs]) for i in range(0, len(pairs), mbs)]

    def _plan_ahead(self, weights_D: np.ndarray) -> None:
        pending = _Pending(self.sampler.state_dict(), np.asarray(weights_D, dtype=np.float64))
        try:
            pending.plan = self.sampler.plan(pending.weights_D, self.cfg.train.global_batch_size)
        except DataError as exc:  # raised when the batch is asked for, so earlier steps still run
            pending.error = exc
        else:
            ex = self._executor
            pending.batches = ex.submit(self._read, pending.plan) if ex is not None else self._read(pending.plan)
        self._pending = pending

    def micro_batches(self, step: int, first_index: int) -> list[Batch]:
        """This replica's micro-batches of the global batch at `step` (starting at sample first_index)."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("TrainData.start() was not called")
        if pending.error is not None:
            raise pending.error
        plan = pending.plan
        assert plan is not None and pending.batches is not None
        if (plan.step, plan.first_index) != (step, first_index):
            raise RuntimeError(
                f"asked for step {step} at sample {first_index}, planned step {plan.step} at {plan.first_index}"
            )
        batches = pending.batches.result() if isinstance(pending.batches, Future) else pending.batches
        self.current = plan
        if self.ledger is not None:
            self.ledger.write(plan)
        self._plan_ahead(self.policy.weights_for(step + 1))
        return batches

    # -- policy feedback and observability ----------------------------------------------------

    def observe(self, step: int, loss_sum_D: np.ndarray, count_D: np.ndarray) -> None:
        """Per-domain LM-loss sums and counts of the batch at `step`, identical on every rank."""
        self.policy.observe(step, loss_sum_D, count_D)

    def record(self) -> dict[str, Any]:
        """Target and realised mixture of the last batch handed out, and the policy's current weights."""
        plan = self.current
        if plan is None:
            return {}
        realised = plan.counts(len(self.domains)) / plan.size
        return {
            "mixture_target": dict(zip(self.domains, plan.weights_D.tolist(), strict=True)),
            "mixture_realised": dict(zip(self.domains, realised.tolist(), strict=True)),
        }

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able data state (identical on every rank): sampler before the planned-ahead batch, its
        weights, the policy."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("TrainData.start() was not called")
        return {
            "version": STATE_VERSION,
            "sampler": pending.sampler_before,
            "pending_weights": pending.weights_D.tolist(),
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the sampler and policy of state_dict() (start() plans the pending batch again)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')} != {STATE_VERSION}")
        self.sampler.load_state_dict(state["sampler"])
        self.policy.load_state_dict(state["policy"])
