"""Training and validation batches: `build_train_source(cfg)` and `build_val_batches(cfg)`.

Shape suffixes: B samples in the batch, S = train.seq_len tokens per sample.

A source reads packed samples by (domain, packed sample id); which sample fills which slot of a
global batch is decided by the mixture sampler (moe_train.data.sampler) under the mixture policy
(moe_train.data.policies); moe_train.data.loader ties them together for the trainer.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_train.config import Config
from moe_train.data.errors import DataError
from moe_train.data.manifest import read_manifest
from moe_train.data.shards import TokenStream
from moe_train.data.validate import open_split, selected_domains

log = logging.getLogger(__name__)

MOCK_TRAIN_STREAM = 0
MOCK_VAL_STREAM = 1


@dataclass
class Batch:
    """One micro-batch: inputs, next-token labels and the domain of each sample."""

    tokens_BS: torch.Tensor
    """Input token ids (int64)."""
    labels_BS: torch.Tensor
    """Target token ids: the inputs shifted left by one (int64)."""
    domain_B: torch.Tensor
    """Index into the source's `domains` of each sample (int64)."""

    def to(self, device: torch.device | str) -> Batch:
        """The batch on another device."""
        return Batch(self.tokens_BS.to(device), self.labels_BS.to(device), self.domain_B.to(device))


def make_batch(samples: Sequence[np.ndarray], domains: Sequence[int]) -> Batch:
    """Stack packed samples of S + 1 tokens into a Batch (inputs [:-1], labels [1:])."""
    packed_BS1 = torch.from_numpy(np.stack(samples).astype(np.int64, copy=False))
    return Batch(
        tokens_BS=packed_BS1[:, :-1].contiguous(),
        labels_BS=packed_BS1[:, 1:].contiguous(),
        domain_B=torch.tensor(list(domains), dtype=torch.int64),
    )


class TrainSource(ABC):
    """Packed training samples of every domain, read by (domain position, packed sample id)."""

    domains: list[str]
    """Domain names; Batch.domain_B indexes this list."""
    seq_len: int
    """Tokens per sample (S)."""

    @abstractmethod
    def num_samples(self, d: int) -> int | None:
        """Packed samples of domain d (None: unlimited)."""

    @abstractmethod
    def read(self, d: int, sample_id: int) -> np.ndarray:
        """S + 1 token ids of packed sample `sample_id` of domain d."""

    def batch(self, pairs: Sequence[tuple[int, int]]) -> Batch:
        """The samples (domain position, sample id) stacked in the order given."""
        if len(pairs) == 0:
            raise DataError("a batch needs at least one sample")
        return make_batch([self.read(d, k) for d, k in pairs], [d for d, _ in pairs])


class ShardSource(TrainSource):
    """Packed samples of per-domain token shards."""

    def __init__(self, shards: list[TokenStream], domains: list[str], seq_len: int):
        self.domains = domains
        self.seq_len = seq_len
        self.shards = shards
        for name, shard in zip(domains, shards, strict=True):
            if shard.num_samples(seq_len) < 1:
                raise DataError(f"domain '{name}' has fewer than seq_len + 1 ({seq_len + 1}) train tokens")

    def num_samples(self, d: int) -> int | None:
        """Packed samples of domain d at this seq_len."""
        return self.shards[d].num_samples(self.seq_len)

    def read(self, d: int, sample_id: int) -> np.ndarray:
        """S + 1 token ids of packed sample `sample_id` of domain d."""
        return self.shards[d].sample(sample_id, self.seq_len)


class MockSource(TrainSource):
    """Random tokens in [0, vocab_size); sample i comes from a generator seeded by (seed, stream, i)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, stream: int = MOCK_TRAIN_STREAM) -> None:
        self.domains = ["mock"]
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.seed = seed
        self.stream = stream

    def num_samples(self, d: int) -> int | None:
        """Unlimited: the sampler's draw k of the one domain is sample k (= the global index)."""
        return None

    def read(self, d: int, sample_id: int) -> np.ndarray:
        """S + 1 random token ids of sample `sample_id`."""
        rng = np.random.default_rng([self.seed, self.stream, sample_id])
        return rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int64)

    def get_batch(self, sample_indices: Sequence[int]) -> Batch:
        """The samples at these global indices, in the order given (pure in the indices)."""
        bad = [i for i in sample_indices if i < 0]
        if bad:
            raise DataError(f"sample indices must be >= 0, got {bad[0]}")
        return self.batch([(0, int(i)) for i in sample_indices])


def build_train_source(cfg: Config) -> TrainSource:
    """The training source of a config: MockSource when data.mock, else the shards of data.dir."""
    if cfg.data.mock:
        return MockSource(cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    root = Path(cfg.data.dir)
    manifest = read_manifest(root)
    domains = selected_domains(cfg, manifest)
    shards = [open_split(root, manifest, d, "train") for d in domains]
    return ShardSource(shards, domains, cfg.train.seq_len)


def val_sample_ids(num_samples: int, needed: int) -> list[int]:
    """`needed` packed sample ids spread evenly over a split of `num_samples` (repeating if short)."""
    if num_samples >= needed:
        return [(j * num_samples) // needed for j in range(needed)]
    return [j % num_samples for j in range(needed)]


def _val_batches_for(shard: TokenStream, domain: str, d: int, cfg: Config) -> list[Batch]:
    seq_len, mbs = cfg.train.seq_len, cfg.train.micro_batch_size
    n = shard.num_samples(seq_len)
    if n < 1:
        raise DataError(f"domain '{domain}' has fewer than seq_len + 1 ({seq_len + 1}) val tokens")
    needed = cfg.train.eval_batches * mbs
    if n < needed:
        log.warning("domain '%s': %d val samples < %d wanted; repeating them", domain, n, needed)
    ids = val_sample_ids(n, needed)
    return [
        make_batch([shard.sample(k, seq_len) for k in ids[j : j + mbs]], [d] * len(ids[j : j + mbs]))
        for j in range(0, needed, mbs)
    ]


def build_val_batches(cfg: Config) -> dict[str, list[Batch]]:
    """train.eval_batches micro-batches per domain from the held-out split, the same every call."""
    mbs = cfg.train.micro_batch_size
    if cfg.data.mock:
        mock = MockSource(cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed, stream=MOCK_VAL_STREAM)
        return {"mock": [mock.get_batch(range(j * mbs, (j + 1) * mbs)) for j in range(cfg.train.eval_batches)]}
    root = Path(cfg.data.dir)
    manifest = read_manifest(root)
    domains = selected_domains(cfg, manifest)
    return {
        name: _val_batches_for(open_split(root, manifest, name, "val"), name, d, cfg) for d, name in enumerate(domains)
    }
