"""Byte-level BPE tokenizer (HF `tokenizers`): train on a sample of every domain, or load one."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe_train.data.errors import DataError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
CHUNK_BYTES = 4096


def train_bpe(texts: Iterator[str], vocab_size: int, eos_token: str = EOS_TOKEN) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` entries (EOS included, id 0) on the given texts."""
    if vocab_size < 257:
        raise DataError(f"--vocab-size ({vocab_size}) must be >= 257 (256 bytes + {eos_token})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"tokenizer {p} does not exist")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises a bare Exception on parse errors
        raise DataError(f"tokenizer {p} could not be loaded ({str(exc).splitlines()[0]})") from None


def eos_id(tok: Tokenizer, eos_token: str, where: str) -> int:
    """Id of the EOS token; a tokenizer without it cannot separate documents."""
    idx = tok.token_to_id(eos_token)
    if idx is None:
        raise DataError(f"tokenizer {where} has no token {eos_token!r} (pass --eos-token)")
    return int(idx)


def split_chunks(text: str, size: int = CHUNK_BYTES) -> list[str]:
    """Cut text into pieces of about `size` characters at line ends (lossless: they join back)."""
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        chunks.append(text[start:end])
        start = end
    return chunks


def encode_documents(tok: Tokenizer, docs: list[str]) -> list[np.ndarray]:
    """Token ids of each document (no EOS), encoded in parallel with encode_batch on ~4 KB chunks."""
    pieces: list[str] = []
    owner: list[int] = []
    for i, doc in enumerate(docs):
        chunks = split_chunks(doc)
        pieces += chunks
        owner += [i] * len(chunks)
    encodings = tok.encode_batch(pieces, add_special_tokens=False)
    parts: list[list[np.ndarray]] = [[] for _ in docs]
    for i, enc in zip(owner, encodings, strict=True):
        parts[i].append(np.asarray(enc.ids, dtype=np.int64))
    return [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts]
