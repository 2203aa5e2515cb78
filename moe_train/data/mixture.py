"""Within-domain order: draw k of a domain → packed sample id, epochs without replacement.

Draw k of a domain with n packed samples is sample perm_e[k mod n] with e = k // n and perm_e a
seeded permutation of range(n) for epoch e; each sample is seen once per epoch. The permutation is
seeded by (seed, the domain's name, e), so selecting a subset of domains does not reshuffle the
others. Which domain fills which slot of a global batch is the mixture sampler's job
(moe_train.data.sampler).
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

_EPOCH_STREAM = 2


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
