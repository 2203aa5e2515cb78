"""Which documents of a domain are held out for validation: a seeded hash of their text decides.

The documents are ranked by sha256(seed, domain, text); the lowest-ranked go to validation until it
holds at least max(val_fraction * domain bytes, val_min_bytes) bytes, but never more than half of
the documents. Whole documents are held out, so no validation text is seen in training (up to
duplicates inside the source). The rank depends only on the text, not on the order or the cap.
"""

from __future__ import annotations

import hashlib

from moe_train.data.errors import DataError


def doc_rank_key(seed: int, domain: str, text: str) -> str:
    """Seeded hash of a document that orders the validation hold-out."""
    return hashlib.sha256(f"{seed}\0{domain}\0{text}".encode()).hexdigest()


def val_positions(docs: list[str], seed: int, domain: str, val_fraction: float, val_min_bytes: int) -> set[int]:
    """Positions (in `docs`) of the documents held out for validation."""
    if len(docs) < 2:
        raise DataError(f"domain '{domain}' has {len(docs)} document(s); need >= 2 to hold out a validation split")
    sizes = [len(d.encode("utf-8")) for d in docs]
    target = max(val_fraction * sum(sizes), val_min_bytes)
    ranked = sorted(range(len(docs)), key=lambda i: doc_rank_key(seed, domain, docs[i]))
    chosen: set[int] = set()
    held = 0
    for i in ranked[: len(docs) // 2]:
        if held >= target:
            break
        chosen.add(i)
        held += sizes[i]
    return chosen


def split_documents(
    docs: list[str], seed: int, domain: str, val_fraction: float, val_min_bytes: int
) -> tuple[list[str], list[str]]:
    """(train documents, validation documents), each in the original order."""
    held = val_positions(docs, seed, domain, val_fraction, val_min_bytes)
    train = [d for i, d in enumerate(docs) if i not in held]
    val = [d for i, d in enumerate(docs) if i in held]
    return train, val
