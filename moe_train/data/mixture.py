"""Pure sampling plan: global sample index → (domain, draw k of that domain) → packed sample.

Every quantity is a function of (seed, index) alone, so a batch is the same whatever the
data-parallel layout, the order of the request, or whether the run was resumed.

Domains — stratified blocks. The index stream is cut into blocks of B consecutive indices; each
block holds c_d samples of domain d (uniform: B = number of domains, c_d = 1; with weights:
B = MIXTURE_BLOCK and c_d ∝ weight by largest remainder), laid out in a seeded random order per
block. Index i in block b at a position that is the r-th of domain d's positions is draw
k = b * c_d + r of domain d. So the mixture is exact over every block, not just in expectation.

Within a domain — epochs without replacement. Draw k of a domain with n packed samples is sample
perm_e[k mod n] with e = k // n and perm_e a seeded permutation of range(n) for epoch e; each
sample is seen once per epoch. The permutation is seeded by the domain's name, so selecting a
subset of domains does not reshuffle the others.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence

import numpy as np

MIXTURE_BLOCK = 1024
_BLOCK_STREAM = 1
_EPOCH_STREAM = 2


def block_counts(num_domains: int, weights: Sequence[float] | None) -> np.ndarray:
    """Samples of each domain per block: ones when uniform, else weights scaled to MIXTURE_BLOCK."""
    if weights is None:
        return np.ones(num_domains, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    raw = w / w.sum() * MIXTURE_BLOCK
    counts = np.floor(raw).astype(np.int64)
    short = MIXTURE_BLOCK - int(counts.sum())
    order = sorted(range(num_domains), key=lambda d: (-(raw[d] - counts[d]), d))
    counts[order[:short]] += 1
    return counts


class MixturePlan:
    """Maps a global sample index to (domain position, draw k within that domain)."""

    def __init__(self, counts: np.ndarray, seed: int) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.block_size = int(self.counts.sum())
        self.seed = seed
        layout = np.repeat(np.arange(len(self.counts)), self.counts)
        self._layout = layout
        self._block = functools.lru_cache(maxsize=256)(self._make_block)

    def _make_block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, _BLOCK_STREAM, block])
        domain_of = self._layout[rng.permutation(self.block_size)]
        rank_of = np.empty(self.block_size, dtype=np.int64)
        for d in range(len(self.counts)):
            where = np.flatnonzero(domain_of == d)
            rank_of[where] = np.arange(len(where))
        return domain_of, rank_of

    def locate(self, index: int) -> tuple[int, int]:
        """(domain position, draw k of that domain) of global sample `index`."""
        block, pos = divmod(index, self.block_size)
        domain_of, rank_of = self._block(block)
        d = int(domain_of[pos])
        return d, block * int(self.counts[d]) + int(rank_of[pos])


class EpochOrder:
    """Draw k of a domain → packed sample id, a fresh seeded permutation every epoch."""

    def __init__(self, domain: str, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.salt = zlib.crc32(domain.encode())
        self._perm = functools.lru_cache(maxsize=4)(self._make_perm)

    def _make_perm(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _EPOCH_STREAM, self.salt, epoch])
        return rng.permutation(self.num_samples)

    def sample_id(self, k: int) -> int:
        """Packed sample id of draw k."""
        epoch, j = divmod(k, self.num_samples)
        return int(self._perm(epoch)[j])

    def sample_ids(self, draws: np.ndarray) -> np.ndarray:
        """Packed sample ids of an array of draws (vectorised sample_id)."""
        epochs, js = np.divmod(np.asarray(draws, dtype=np.int64), self.num_samples)
        out = np.empty(len(js), dtype=np.int64)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self._perm(int(epoch))[js[where]]
        return out
