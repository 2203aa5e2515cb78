"""Token shards on disk: a flat ``.bin`` of token ids plus an ``.idx.json`` index.

Layout of one split of one domain (``<dir>/<domain>/train.bin`` + ``train.idx.json``): the documents'
token ids, each document followed by the EOS token, concatenated into one little-endian array of
``dtype`` (uint16 when the vocabulary has < 65536 entries, else uint32). The index records the dtype,
the number of tokens and documents, the start offset of every document, the file size and its
sha256, so a reader can tell a truncated or corrupt file from a good one.

Packing (Megatron style): the stream is cut into samples of seq_len + 1 tokens with stride seq_len,
so sample k covers tokens [k * seq_len, (k + 1) * seq_len + 1) and consecutive samples share one
token (the last label of one is the first input of the next). Samples cross document boundaries;
the EOS tokens mark them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from moe_train.data.errors import DataError

INDEX_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """Smallest unsigned dtype that holds every id of a vocabulary of this size."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def index_path(bin_path: Path) -> Path:
    """``train.bin`` → ``train.idx.json``."""
    return bin_path.with_suffix(".idx.json")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Appends documents (token arrays) to a ``.bin`` and writes its index on close."""

    def __init__(self, path: Path, dtype: np.dtype[Any], eos_id: int) -> None:
        self.path = path
        self.dtype = dtype
        self.eos_id = eos_id
        self.num_tokens = 0
        self.doc_offsets: list[int] = []
        self._sha = hashlib.sha256()
        self._fh = path.open("wb")

    def add_document(self, ids: list[int] | np.ndarray) -> None:
        """Append one document's ids followed by EOS."""
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[:-1] = ids
        arr[-1] = self.eos_id
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        self._fh.write(data)
        self._sha.update(data)
        self.doc_offsets.append(self.num_tokens)
        self.num_tokens += len(arr)

    def close(self) -> dict[str, Any]:
        """Flush the data file, write the index next to it and return the index."""
        self._fh.close()
        index = {
            "version": INDEX_VERSION,
            "dtype": self.dtype.name,
            "num_tokens": self.num_tokens,
            "num_docs": len(self.doc_offsets),
            "nbytes": self.num_tokens * self.dtype.itemsize,
            "sha256": self._sha.hexdigest(),
            "doc_offsets": self.doc_offsets,
        }
        index_path(self.path).write_text(json.dumps(index))
        return index


def _read_index(path: Path) -> dict[str, Any]:
    ipath = index_path(path)
    if not ipath.is_file():
        raise DataError(f"shard index {ipath} does not exist; rebuild with `moe-train data build`")
    try:
        index = json.loads(ipath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"shard index {ipath} is not valid JSON ({exc.__class__.__name__})") from None
    keys = ("version", "dtype", "num_tokens", "num_docs", "nbytes", "sha256", "doc_offsets")
    missing = [k for k in keys if k not in index] if isinstance(index, dict) else list(keys)
    if missing:
        raise DataError(f"shard index {ipath} lacks {', '.join(missing)}")
    if index["version"] != INDEX_VERSION or index["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"shard index {ipath} has version {index['version']} / dtype {index['dtype']}")
    return index


class TokenShard:
    """Read-only, memory-mapped view of one shard, checked against its index on open."""

    def __init__(self, path: str | Path, verify_checksum: bool = False) -> None:
        self.path = Path(path)
        self.index = _read_index(self.path)
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.num_tokens: int = self.index["num_tokens"]
        self._check_file(verify_checksum)
        self.tokens = (
            np.memmap(self.path, dtype=self.dtype, mode="r") if self.num_tokens else np.empty(0, dtype=self.dtype)
        )

    def _check_file(self, verify_checksum: bool) -> None:
        if not self.path.is_file():
            raise DataError(f"shard {self.path} does not exist; rebuild with `moe-train data build`")
        size = self.path.stat().st_size
        expected = self.num_tokens * self.dtype.itemsize
        if size != expected or self.index["nbytes"] != expected:
            raise DataError(f"shard {self.path} is truncated or corrupt: {size} bytes on disk, index says {expected}")
        if verify_checksum and file_sha256(self.path) != self.index["sha256"]:
            raise DataError(f"shard {self.path} is corrupt: sha256 differs from its index")

    @property
    def doc_offsets(self) -> np.ndarray:
        """Start offset of each document in the token stream."""
        return np.asarray(self.index["doc_offsets"], dtype=np.int64)

    def num_samples(self, seq_len: int) -> int:
        """Number of packed samples of seq_len + 1 tokens (stride seq_len)."""
        return max(0, (self.num_tokens - 1) // seq_len)

    def sample(self, k: int, seq_len: int) -> np.ndarray:
        """Packed sample k: tokens [k * seq_len, (k + 1) * seq_len + 1) as int64."""
        if not 0 <= k < self.num_samples(seq_len):
            raise IndexError(f"sample {k} out of range for {self.path} at seq_len {seq_len}")
        start = k * seq_len
        return np.asarray(self.tokens[start : start + seq_len + 1], dtype=np.int64)
