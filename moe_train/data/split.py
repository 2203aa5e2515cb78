"""Which documents of a domain are held out for validation, decided in one streaming pass.

Every document gets a rank u in [0, 1) from sha256(seed, domain, text). It is held out when
u < val_fraction, or when it is among the lowest-ranked documents needed to reach val_min_bytes of
held-out text; never more than half of the documents are held out. Only the lowest-ranked documents
that could still be needed for val_min_bytes are kept in memory (about val_min_bytes of keys), so
memory does not grow with the corpus. Whole documents are held out, so no validation text is seen in
training (up to duplicates inside the source); the choice depends on the texts, not their order.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable

from moe_train.data.errors import DataError


def doc_rank_key(seed: int, domain: str, text: str) -> str:
    """Seeded hash of a document that orders the validation hold-out."""
    return hashlib.sha256(f"{seed}\0{domain}\0{text}".encode()).hexdigest()


def rank_of(key: str) -> float:
    """The rank in [0, 1) of a document key."""
    return int(key[:15], 16) / 16**15


class ValSelector:
    """Streaming hold-out decision: feed every document (`add`), then `finish`, then ask `is_val`."""

    def __init__(self, seed: int, domain: str, val_fraction: float, val_min_bytes: int) -> None:
        self.seed, self.domain = seed, domain
        self.val_fraction, self.val_min_bytes = val_fraction, val_min_bytes
        self.num_docs = 0
        self.total_bytes = 0
        self.fraction_docs = 0
        self.fraction_bytes = 0
        self._low: list[tuple[float, str, int]] = []  # max-heap by rank (negated) of candidates
        self._low_bytes = 0
        self.extra: set[str] = set()

    def add(self, text: str) -> None:
        """Account for one document."""
        key = doc_rank_key(self.seed, self.domain, text)
        size = len(text.encode("utf-8"))
        self.num_docs += 1
        self.total_bytes += size
        u = rank_of(key)
        if u < self.val_fraction:
            self.fraction_docs += 1
            self.fraction_bytes += size
            return
        heapq.heappush(self._low, (-u, key, size))
        self._low_bytes += size
        while self._low and self._low_bytes - self._low[0][2] >= self.val_min_bytes:
            self._low_bytes -= heapq.heappop(self._low)[2]

    def finish(self) -> None:
        """Fix the extra (val_min_bytes) hold-outs; at most half of the documents are held out."""
        if self.num_docs < 2:
            raise DataError(
                f"domain '{self.domain}' has {self.num_docs} document(s); need >= 2 to hold out a validation split"
            )
        need = self.val_min_bytes - self.fraction_bytes
        room = max(self.num_docs // 2 - self.fraction_docs, 0)
        held = 0
        for neg_u, key, size in sorted(self._low, reverse=True):  # lowest rank first
            del neg_u
            if held >= need or len(self.extra) >= room:
                break
            self.extra.add(key)
            held += size
        self._low = []

    def is_val(self, text: str) -> bool:
        """Whether a document is held out (after finish)."""
        key = doc_rank_key(self.seed, self.domain, text)
        return rank_of(key) < self.val_fraction or key in self.extra


def split_documents(
    docs: Iterable[str], seed: int, domain: str, val_fraction: float, val_min_bytes: int
) -> tuple[list[str], list[str]]:
    """(train documents, validation documents), each in the original order."""
    docs = list(docs)
    selector = ValSelector(seed, domain, val_fraction, val_min_bytes)
    for doc in docs:
        selector.add(doc)
    selector.finish()
    val = [selector.is_val(d) for d in docs]
    return [d for d, v in zip(docs, val, strict=True) if not v], [d for d, v in zip(docs, val, strict=True) if v]
