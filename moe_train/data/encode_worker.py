"""Tokenisation in a worker process of `moe-train data build` (one tokenizer per process)."""

from __future__ import annotations

import os

import numpy as np
from tokenizers import Tokenizer

from moe_train.data.tokenizer import encode_documents, load_tokenizer

_TOKENIZER: Tokenizer | None = None


def init(tokenizer_path: str, in_worker: bool = True) -> None:
    """Load the tokenizer once per process; a worker process runs without the tokenizer's own threads."""
    global _TOKENIZER
    if in_worker:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = load_tokenizer(tokenizer_path)


def encode(docs: list[str]) -> list[np.ndarray]:
    """Token ids of each document (no EOS), as int64 arrays."""
    assert _TOKENIZER is not None, "encode_worker.init() was not called"
    return encode_documents(_TOKENIZER, docs)
