"""Build a data directory: documents → held-out split → tokenizer → token shards + manifest.

Output (``<out>/``)::

    manifest.json           domains, sources and licences, tokenizer, shard index summaries
    SOURCES.md              the licence record of every source, for humans
    tokenizer.json          the byte-level BPE used for every shard
    <domain>/train.bin      token shards (see moe_train.data.shards) ...
    <domain>/train.idx.json ... and their indices
    <domain>/val.bin, <domain>/val.idx.json

Everything is written into a sibling temporary directory that is renamed into place at the end, so
a failed build leaves no partial output.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tqdm import tqdm

from moe_train.data.errors import DataError
from moe_train.data.manifest import MANIFEST_NAME, TOKENIZER_NAME, write_manifest, write_sources_md
from moe_train.data.shards import ShardWriter, file_sha256, token_dtype
from moe_train.data.sources import TextSource
from moe_train.data.split import split_documents
from moe_train.data.tokenizer import EOS_TOKEN, encode_documents, eos_id, load_tokenizer, train_bpe

log = logging.getLogger(__name__)

ENCODE_BATCH_BYTES = 1 << 20


@dataclass
class BuildOptions:
    """What to build and how; defaults build the demo corpus in a few minutes on 2 cores."""

    out: Path
    """Output directory (must not exist unless force)."""
    sources: list[TextSource]
    """One source per domain."""
    tokenizer: Path | None = None
    """An existing tokenizer.json to use; None trains a byte-level BPE."""
    vocab_size: int = 8192
    """Vocabulary size of the trained tokenizer (EOS included)."""
    eos_token: str = EOS_TOKEN
    """End-of-document token appended to every document."""
    max_bytes: int = 5_000_000
    """About this many UTF-8 bytes of text per domain (whole documents); 0 means no cap."""
    val_fraction: float = 0.01
    """Fraction of each domain's bytes held out for validation (whole documents)."""
    val_min_bytes: int = 32_768
    """Hold out at least this many bytes per domain (at most half of its documents)."""
    tokenizer_sample_bytes: int = 2_000_000
    """Bytes of training text per domain that the tokenizer is trained on."""
    seed: int = 1234
    """Seed of the validation hold-out."""
    force: bool = False
    """Replace an existing output directory."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts recorded in the manifest (e.g. the command line)."""


@dataclass
class Domain:
    """A domain's documents after capping and splitting."""

    source: TextSource
    train: list[str]
    val: list[str]
    capped: bool

    @property
    def name(self) -> str:
        """Domain name."""
        return self.source.info.domain


def collect_documents(source: TextSource, max_bytes: int) -> tuple[list[str], bool]:
    """Documents of a source, in order, until about max_bytes (0: all); also whether it was capped."""
    docs: list[str] = []
    total = 0
    for doc in source.documents():
        if max_bytes and total >= max_bytes:
            return docs, True
        docs.append(doc)
        total += len(doc.encode("utf-8"))
    return docs, False


def _load_domain(source: TextSource, opts: BuildOptions) -> Domain:
    docs, capped = collect_documents(source, opts.max_bytes)
    name = source.info.domain
    if not docs:
        raise DataError(f"domain '{name}' ({source.info.origin}) has no non-empty documents")
    if capped:
        log.warning("domain '%s' capped at ~%d bytes (--max-bytes 0 keeps everything)", name, opts.max_bytes)
    train, val = split_documents(docs, opts.seed, name, opts.val_fraction, opts.val_min_bytes)
    log.info("domain '%s': %d documents (%d held out for validation)", name, len(docs), len(val))
    return Domain(source, train, val, capped)


def _tokenizer_sample(domains: list[Domain], per_domain: int) -> Iterator[str]:
    for dom in domains:
        taken = 0
        for doc in dom.train:
            if taken >= per_domain:
                break
            yield doc
            taken += len(doc.encode("utf-8"))


def _make_tokenizer(domains: list[Domain], opts: BuildOptions) -> tuple[Tokenizer, dict[str, Any]]:
    if opts.tokenizer is not None:
        tok = load_tokenizer(opts.tokenizer)
        origin = str(opts.tokenizer)
    else:
        log.info(
            "training byte-level BPE (vocab %d) on <= %d bytes per domain", opts.vocab_size, opts.tokenizer_sample_bytes
        )
        tok = train_bpe(_tokenizer_sample(domains, opts.tokenizer_sample_bytes), opts.vocab_size, opts.eos_token)
        origin = f"byte-level BPE trained on <= {opts.tokenizer_sample_bytes} bytes per domain"
    info: dict[str, Any] = {
        "file": TOKENIZER_NAME,
        "origin": origin,
        "vocab_size": tok.get_vocab_size(),
        "requested_vocab_size": None if opts.tokenizer is not None else opts.vocab_size,
        "eos_token": opts.eos_token,
        "eos_id": eos_id(tok, opts.eos_token, origin),
    }
    if opts.tokenizer is None and info["vocab_size"] < opts.vocab_size:
        info["vocab_note"] = _short_vocab_note(info["vocab_size"], opts)
        log.warning("%s", info["vocab_note"])
    return tok, info


def _short_vocab_note(got: int, opts: BuildOptions) -> str:
    """Why the trained vocabulary is smaller than asked, and what to do."""
    return (
        f"the tokenizer has {got:,} tokens, fewer than --vocab-size {opts.vocab_size:,}: the BPE ran out of "
        f"pairs seen at least twice in its sample (<= {opts.tokenizer_sample_bytes:,} bytes per domain); more "
        f"text gives more tokens, and any model.vocab_size >= {got:,} fits this data"
    )


def _doc_batches(docs: list[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= ENCODE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_split(tok: Tokenizer, docs: list[str], path: Path, tok_info: dict[str, Any], bar: tqdm) -> dict[str, Any]:
    writer = ShardWriter(path, token_dtype(tok_info["vocab_size"]), tok_info["eos_id"])
    for batch in _doc_batches(docs):
        for ids in encode_documents(tok, batch):
            writer.add_document(ids)
        bar.update(sum(len(d) for d in batch))
    index = writer.close()
    return {k: index[k] for k in ("dtype", "num_tokens", "num_docs", "nbytes", "sha256")} | {
        "file": path.relative_to(path.parent.parent).as_posix()
    }


def _write_domain(tok: Tokenizer, dom: Domain, root: Path, tok_info: dict[str, Any]) -> dict[str, Any]:
    (root / dom.name).mkdir()
    chars = sum(len(d) for d in dom.train) + sum(len(d) for d in dom.val)
    with tqdm(total=chars, desc=f"tokenize {dom.name}", unit="char", unit_scale=True, disable=None) as bar:
        train = _write_split(tok, dom.train, root / dom.name / "train.bin", tok_info, bar)
        val = _write_split(tok, dom.val, root / dom.name / "val.bin", tok_info, bar)
    log.info("domain '%s': %d train tokens, %d val tokens", dom.name, train["num_tokens"], val["num_tokens"])
    return {
        "source": dom.source.info.to_dict(),
        "documents": len(dom.train) + len(dom.val),
        "bytes": sum(len(d.encode("utf-8")) for d in dom.train + dom.val),
        "capped": dom.capped,
        "train": train,
        "val": val,
    }


def _check_options(opts: BuildOptions) -> None:
    names = [s.info.domain for s in opts.sources]
    if not names:
        raise DataError("no domains to build (give --input NAME=PATH or --demo)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"domain(s) {', '.join(dupes)} given more than once")
    if opts.out.exists() and not opts.force:
        raise DataError(f"output {opts.out} already exists; pass --force to replace it")
    if not 0 <= opts.val_fraction < 0.5:
        raise DataError(f"--val-fraction ({opts.val_fraction}) must be in [0, 0.5)")


def _build_into(tmp: Path, opts: BuildOptions) -> dict[str, Any]:
    domains = [_load_domain(s, opts) for s in opts.sources]
    tok, tok_info = _make_tokenizer(domains, opts)
    tok.save(str(tmp / TOKENIZER_NAME))
    tok_info["sha256"] = file_sha256(tmp / TOKENIZER_NAME)
    manifest: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": opts.seed,
        "max_bytes_per_domain": opts.max_bytes,
        "val_fraction": opts.val_fraction,
        "val_min_bytes": opts.val_min_bytes,
        "tokenizer": tok_info,
        "domains": {d.name: _write_domain(tok, d, tmp, tok_info) for d in domains},
        "extra": opts.extra,
    }
    write_manifest(tmp, manifest)
    write_sources_md(tmp, manifest)
    return manifest


def _replace(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def build_dataset(opts: BuildOptions) -> dict[str, Any]:
    """Build opts.out from opts.sources; returns the manifest. Raises DataError; leaves no partial dir."""
    _check_options(opts)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha1(f"{os.getpid()}{datetime.datetime.now()}".encode()).hexdigest()[:8]
    tmp = opts.out.parent / f".{opts.out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        manifest = _build_into(tmp, opts)
        _replace(tmp, opts.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%s)", opts.out, MANIFEST_NAME)
    return manifest
