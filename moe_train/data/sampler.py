"""The mixture sampler: target weights → the exact composition and contents of every global batch.

Shape suffixes: G samples in the global batch, D domains.

Composition. For a global batch of G samples under target weights w (summing to 1), domain d gets
n_d = floor(G w_d) or floor(G w_d) + 1 samples (so |n_d - G w_d| < 1, "exact to one sequence"); the
G - sum(floor) extra samples go to the domains with the largest deficit, the running difference
between the samples a domain should have had (sum of G w_d over past batches) and those it got.
Over many batches each domain's count therefore tracks its cumulative target closely too.

Order. The n_d slots of each domain are laid out in a seeded random order per batch (seed, step), so
every data-parallel slice of the batch gets a similar mix. Data-parallel replica r reads slice r.

Contents. Each domain keeps a cursor k_d (draws so far); its draw k is packed sample perm_e[k mod n]
with e = k // n and perm_e a seeded permutation of the domain's n packed samples for epoch e
(moe_train.data.mixture.EpochOrder), so every sample is seen once per epoch.

State. The plan of batch t is a function of (seed, the weights of batches 0..t, the global batch
sizes): the sampler's state (cursors, deficits, exhausted domains, next index) is JSON-able and saved
with checkpoints, so a resume under any data-parallel size continues the identical sequence.

Exhaustion. With max_epochs > 0 a domain that cannot supply its share of a batch without starting
epoch max_epochs is exhausted: on_exhausted="error" stops with a DataError naming it, "drop" warns
and gives its weight to the other domains from that batch on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_train.data.errors import DataError
from moe_train.data.mixture import EpochOrder

log = logging.getLogger(__name__)

_SLOT_STREAM = 3
STATE_VERSION = 1


@dataclass
class BatchPlan:
    """Which packed sample fills every slot of one global batch."""

    step: int
    """Optimizer steps taken before this batch (0 for the first batch)."""
    first_index: int
    """Global sample index of slot 0 (consumed samples before this batch)."""
    weights_D: np.ndarray
    """Target weights the batch was planned with (exhausted domains at 0)."""
    domain_G: np.ndarray
    """Domain position of every slot."""
    sample_G: np.ndarray
    """Packed sample id within its domain of every slot."""
    epoch_G: np.ndarray
    """Epoch of the domain that slot's draw belongs to."""

    @property
    def size(self) -> int:
        """Samples in the global batch (G)."""
        return len(self.domain_G)

    def counts(self, num_domains: int) -> np.ndarray:
        """Samples of each domain in this batch."""
        return np.bincount(self.domain_G, minlength=num_domains)


def batch_counts(weights_D: np.ndarray, size: int, deficit_D: np.ndarray) -> np.ndarray:
    """Samples per domain: floor(size * w) plus one for the largest deficits (only where w has a fraction)."""
    target_D = size * weights_D
    counts_D = np.floor(target_D).astype(np.int64)
    extra = size - int(counts_D.sum())
    frac_D = target_D - counts_D
    eligible = [d for d in range(len(weights_D)) if frac_D[d] > 0]
    ranked = sorted(eligible, key=lambda d: (-(frac_D[d] + deficit_D[d]), d))
    counts_D[ranked[:extra]] += 1
    return counts_D


def normalize(weights: Any, where: str) -> np.ndarray:
    """Weights as float64 summing to 1; one-line DataError when negative, non-finite or all zero."""
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise DataError(f"{where}: weights {w.tolist()} must be finite, >= 0 and not all zero")
    return w / w.sum()


class MixtureSampler:
    """Plans global batches; its state is everything a resumed run needs to plan the same ones."""

    def __init__(
        self,
        domains: list[str],
        num_samples: list[int | None],
        seed: int,
        max_epochs: int = 0,
        on_exhausted: str = "error",
    ) -> None:
        self.domains = domains
        self.num_samples = num_samples
        self.seed = seed
        self.max_epochs = max_epochs
        self.on_exhausted = on_exhausted
        self.orders = [
            EpochOrder(name, n, seed) if n is not None else None for name, n in zip(domains, num_samples, strict=True)
        ]
        d = len(domains)
        self.step = 0
        self.next_index = 0
        self.cursor_D = np.zeros(d, dtype=np.int64)
        self.deficit_D = np.zeros(d, dtype=np.float64)
        self.exhausted_D = np.zeros(d, dtype=bool)

    # -- planning -----------------------------------------------------------------------------

    def _room(self, d: int) -> int | None:
        """Draws domain d can still make before epoch max_epochs (None: unlimited)."""
        n = self.num_samples[d]
        if self.max_epochs == 0 or n is None:
            return None
        return self.max_epochs * n - int(self.cursor_D[d])

    def _exhaust(self, d: int, need: int, room: int) -> None:
        name = self.domains[d]
        if self.on_exhausted == "error":
            raise DataError(
                f"domain '{name}' is exhausted at step {self.step}: the batch needs {need} samples, {room} remain "
                f"of data.mixture.max_epochs={self.max_epochs} epochs of {self.num_samples[d]}; raise "
                "data.mixture.max_epochs or set data.mixture.on_exhausted=drop"
            )
        log.warning(
            "domain '%s' exhausted at step %d after %d epochs (%d samples unused); sampling the other domains",
            name,
            self.step,
            self.max_epochs,
            room,
        )
        self.exhausted_D[d] = True

    def _counts(self, weights_D: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(weights used, counts), dropping domains that are exhausted until the counts fit."""
        while True:
            w = np.where(self.exhausted_D, 0.0, weights_D)
            if w.sum() <= 0:
                raise DataError(
                    f"every domain with weight > 0 is exhausted at step {self.step}; nothing left to sample"
                )
            w = w / w.sum()
            counts_D = batch_counts(w, size, self.deficit_D)
            short = [
                (d, int(c), room) for d, c in enumerate(counts_D) if (room := self._room(d)) is not None and c > room
            ]
            if not short:
                return w, counts_D
            self._exhaust(*short[0])

    def plan(self, weights: Any, size: int) -> BatchPlan:
        """Plan the next global batch of `size` samples under target `weights`; advances the state."""
        weights_D = normalize(weights, f"mixture weights of step {self.step}")
        w, counts_D = self._counts(weights_D, size)
        rng = np.random.default_rng([self.seed, _SLOT_STREAM, self.step])
        domain_G = np.repeat(np.arange(len(counts_D)), counts_D)[rng.permutation(size)]
        sample_G = np.empty(size, dtype=np.int64)
        epoch_G = np.zeros(size, dtype=np.int64)
        for d in np.flatnonzero(counts_D):
            slots = np.flatnonzero(domain_G == d)
            draws = self.cursor_D[d] + np.arange(len(slots))
            order = self.orders[d]
            if order is None:
                sample_G[slots] = draws
            else:
                epoch_G[slots] = draws // order.num_samples
                sample_G[slots] = order.sample_ids(draws)
        plan = BatchPlan(self.step, self.next_index, w, domain_G, sample_G, epoch_G)
        self.cursor_D += counts_D
        self.deficit_D += size * w - counts_D
        self.step += 1
        self.next_index += size
        return plan

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (floats round-trip exactly through json)."""
        return {
            "version": STATE_VERSION,
            "domains": list(self.domains),
            "step": self.step,
            "next_index": self.next_index,
            "cursor": self.cursor_D.tolist(),
            "deficit": self.deficit_D.tolist(),
            "exhausted": self.exhausted_D.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned; the domains must be the same, in the same order."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"sampler state version {state.get('version')} != {STATE_VERSION}")
        if state["domains"] != self.domains:
            raise DataError(
                f"the checkpoint sampled domains {state['domains']}, this run has {self.domains}; "
                "resume with the same data.domains"
            )
        self.step = int(state["step"])
        self.next_index = int(state["next_index"])
        self.cursor_D = np.asarray(state["cursor"], dtype=np.int64)
        self.deficit_D = np.asarray(state["deficit"], dtype=np.float64)
        self.exhausted_D = np.asarray(state["exhausted"], dtype=bool)
