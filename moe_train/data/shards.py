"""Token shards on disk: Megatron-LM indexed datasets (`<prefix>.bin` + `<prefix>.idx`), read directly.

The format (megatron/core/datasets/indexed_dataset.py, "MMIDIDX" version 1) is what Megatron's
preprocess_data.py writes, so existing preprocessed corpora train unchanged, and it is also what
`moe-train data build` writes, in bounded-size shards:

    .idx  9-byte magic b"MMIDIDX\\x00\\x00", <Q version (1), <B dtype code, <Q sequence count N,
          <Q document count M (= documents + 1), int32[N] sequence lengths, int64[N] byte pointers
          into the .bin, int64[M] document indices (the first sequence of each document, then N)
    .bin  the tokens of every sequence, back to back, in the dtype of the code

A domain's split is a list of shard pieces (a prefix and a range of documents); its token stream is
the pieces' tokens concatenated. Packing (Megatron style): the stream is cut into samples of
seq_len + 1 tokens with stride seq_len, so sample k covers tokens [k * seq_len, (k + 1) * seq_len + 1)
and consecutive samples share one token. Samples cross document (and shard) boundaries; the EOS
token that ends every document marks them (Megatron data must be built with --append-eod).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

import numpy as np

from moe_train.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34
DTYPE_CODES: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
CODE_OF = {dtype.name: code for code, dtype in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """Smallest dtype that holds every id of a vocabulary of this size (Megatron's choice)."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class IndexedWriter:
    """Writes one Megatron indexed dataset, one sequence per document (memory: 12 bytes per document)."""

    def __init__(self, prefix: Path, dtype: np.dtype[Any]) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.lengths: list[int] = []
        self.num_tokens = 0
        self._sha = hashlib.sha256()
        self._fh = prefix.with_suffix(".bin").open("wb")

    def add_document(self, ids: np.ndarray) -> None:
        """Append one document's tokens (EOS included by the caller)."""
        data = np.asarray(ids).astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self._fh.write(data)
        self._sha.update(data)
        self.lengths.append(len(ids))
        self.num_tokens += len(ids)

    def close(self) -> dict[str, Any]:
        """Write the .idx; returns {num_tokens, num_docs, nbytes, sha256 of the .bin}."""
        self._fh.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with self.prefix.with_suffix(".idx").open("wb") as fh:
            fh.write(MAGIC + struct.pack("<Q", 1) + struct.pack("<B", CODE_OF[self.dtype.name]))
            fh.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(lengths) + 1))
            fh.write(lengths.tobytes() + pointers.tobytes() + np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
        return {
            "num_tokens": self.num_tokens,
            "num_docs": len(lengths),
            "nbytes": self.num_tokens * self.dtype.itemsize,
            "sha256": self._sha.hexdigest(),
        }


class IndexedDataset:
    """Read-only view of a Megatron indexed dataset; the index is checked against the .bin on open."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        self.idx_path = self.prefix.with_suffix(".idx")
        self.bin_path = self.prefix.with_suffix(".bin")
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise DataError(f"shard file {path} does not exist; rebuild with `moe-train data build`")
        self._read_index()
        expected = int(self.pointers[-1]) + int(self.lengths[-1]) * self.dtype.itemsize if len(self.lengths) else 0
        size = self.bin_path.stat().st_size
        if size != expected:
            raise DataError(
                f"shard {self.bin_path} is truncated or corrupt: {size} bytes on disk, index says {expected}"
            )
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r") if size else np.empty(0, self.dtype)

    def _bad(self, why: str) -> DataError:
        return DataError(f"shard index {self.idx_path} is not a Megatron indexed dataset ({why})")

    def _read_index(self) -> None:
        raw = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        if len(raw) < HEADER_BYTES or bytes(raw[:9]) != MAGIC:
            raise self._bad("bad header")
        version, code, n, m = struct.unpack("<QBQQ", bytes(raw[9:HEADER_BYTES]))
        if version != 1 or code not in DTYPE_CODES:
            raise self._bad(f"version {version}, dtype code {code}")
        if len(raw) not in (HEADER_BYTES + 12 * n + 8 * m, HEADER_BYTES + 13 * n + 8 * m):
            raise self._bad(f"{len(raw)} bytes for {n} sequences and {m} document indices")
        self.dtype = DTYPE_CODES[code].newbyteorder("<")
        self.lengths = np.frombuffer(raw, np.int32, n, HEADER_BYTES).astype(np.int64)
        self.pointers = np.frombuffer(raw, np.int64, n, HEADER_BYTES + 4 * n)
        self.doc_index = np.frombuffer(raw, np.int64, m, HEADER_BYTES + 12 * n)
        starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]) * self.dtype.itemsize
        if n and not np.array_equal(starts, self.pointers):
            raise self._bad("sequences are not stored back to back")
        if m == 0 or self.doc_index[0] != 0 or self.doc_index[-1] != n or np.any(np.diff(self.doc_index) < 0):
            raise self._bad("document indices out of order")

    @property
    def num_docs(self) -> int:
        """Documents in the dataset."""
        return len(self.doc_index) - 1

    def doc_token_range(self, lo: int, hi: int) -> tuple[int, int]:
        """Token offsets [start, end) of documents lo..hi-1 in the .bin stream."""
        if not 0 <= lo <= hi <= self.num_docs:
            raise DataError(f"documents [{lo}, {hi}) out of range for {self.prefix} ({self.num_docs} documents)")
        first, last = int(self.doc_index[lo]), int(self.doc_index[hi])
        offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        return int(offsets[first]), int(offsets[last])

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i."""
        start, end = self.doc_token_range(i, i + 1)
        return np.asarray(self.tokens[start:end])


class TokenStream:
    """A domain's split: shard pieces (a dataset and a document range) as one token stream."""

    def __init__(self, pieces: list[tuple[IndexedDataset, int, int]], name: str) -> None:
        self.name = name
        self.parts = []
        for ds, lo, hi in pieces:
            start, end = ds.doc_token_range(lo, hi)
            self.parts.append(ds.tokens[start:end])
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.num_tokens = int(self.offsets[-1])
        self.dtypes = {ds.dtype.name for ds, _, _ in pieces}

    def num_samples(self, seq_len: int) -> int:
        """Number of packed samples of seq_len + 1 tokens (stride seq_len)."""
        return max(0, (self.num_tokens - 1) // seq_len)

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the stream as int64 (crossing pieces where needed)."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        out = []
        pos = start
        while pos < end:
            part = self.parts[first]
            lo = pos - int(self.offsets[first])
            take = min(end - pos, len(part) - lo)
            out.append(np.asarray(part[lo : lo + take], dtype=np.int64))
            pos += take
            first += 1
        return np.concatenate(out) if len(out) != 1 else out[0]

    def sample(self, k: int, seq_len: int) -> np.ndarray:
        """Packed sample k: tokens [k * seq_len, (k + 1) * seq_len + 1) as int64."""
        if not 0 <= k < self.num_samples(seq_len):
            raise IndexError(f"sample {k} out of range for {self.name} at seq_len {seq_len}")
        return self.tokens(k * seq_len, (k + 1) * seq_len + 1)
