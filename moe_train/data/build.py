"""Build a data directory: documents → held-out split → tokenizer → token shards + manifest.

Output (``<out>/``)::

    manifest.json               format moe_train.data/2: domains, sources and licences, tokenizer,
                                the shards of every split (moe_train.data.manifest)
    SOURCES.md                  the licence record of every source, for humans
    tokenizer.json              the byte-level BPE used for every shard
    <domain>/train_00000.bin    Megatron indexed-dataset shards of at most --shard-mb each
    <domain>/train_00000.idx    (moe_train.data.shards), then val_00000.bin/.idx

Streaming, with memory independent of the corpus size: pass 1 reads every domain once to decide the
validation hold-out (moe_train.data.split) and the --max-bytes cap; the tokenizer is trained on the
first --tokenizer-sample-bytes of each domain's training text; pass 2 reads the documents again and
tokenises them in worker processes (a bounded window of ~1 MB batches in flight, results in order)
while shards are written and rotated. Domains given as Megatron prefixes (--megatron) are not
copied: the manifest points at them, holding out their last documents for validation.

Everything is written into a sibling temporary directory that is renamed into place at the end, so
a failed build leaves no partial output.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import shutil
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

import moe_train.data.encode_worker as encode_worker
from moe_train.data.errors import DataError
from moe_train.data.manifest import MANIFEST_NAME, TOKENIZER_NAME, write_manifest, write_sources_md
from moe_train.data.shards import IndexedDataset, IndexedWriter, file_sha256, token_dtype
from moe_train.data.sources import TextSource
from moe_train.data.split import ValSelector
from moe_train.data.tokenizer import EOS_TOKEN, eos_id, load_tokenizer, train_bpe

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
    """Fraction of each domain's documents (by hash) held out for validation."""
    val_min_bytes: int = 32_768
    """Hold out at least this many bytes per domain (at most half of its documents)."""
    tokenizer_sample_bytes: int = 2_000_000
    """Bytes of training text per domain that the tokenizer is trained on."""
    seed: int = 1234
    """Seed of the validation hold-out."""
    force: bool = False
    """Replace an existing output directory."""
    workers: int = 0
    """Tokenizer processes (0: one per CPU core; 1: tokenise in this process)."""
    shard_bytes: int = 256 << 20
    """Largest .bin shard in bytes (--shard-mb); a split is written as several shards when larger."""
    megatron: dict[str, list[str]] = field(default_factory=dict)
    """Domains read in place from Megatron indexed datasets: name -> path prefixes (no .bin/.idx)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts recorded in the manifest (e.g. the command line)."""


@dataclass
class Scan:
    """Pass 1 over a domain: how many documents to take, which are held out."""

    source: TextSource
    num_docs: int
    selector: ValSelector
    capped: bool

    @property
    def name(self) -> str:
        """Domain name."""
        return self.source.info.domain

    def documents(self) -> Iterator[tuple[str, bool]]:
        """(document, held out?) for the documents pass 1 took, in source order."""
        for i, doc in enumerate(self.source.documents()):
            if i >= self.num_docs:
                return
            yield doc, self.selector.is_val(doc)


def scan_domain(source: TextSource, opts: BuildOptions) -> Scan:
    """Pass 1: the --max-bytes cap and the validation hold-out (memory: about val_min_bytes)."""
    name = source.info.domain
    selector = ValSelector(opts.seed, name, opts.val_fraction, opts.val_min_bytes)
    capped = False
    for doc in source.documents():
        if opts.max_bytes and selector.total_bytes >= opts.max_bytes:
            capped = True
            break
        selector.add(doc)
    if selector.num_docs == 0:
        raise DataError(f"domain '{name}' ({source.info.origin}) has no non-empty documents")
    selector.finish()
    if capped:
        log.warning("domain '%s' capped at ~%d bytes (--max-bytes 0 keeps everything)", name, opts.max_bytes)
    log.info("domain '%s': %d documents, %d bytes", name, selector.num_docs, selector.total_bytes)
    return Scan(source, selector.num_docs, selector, capped)


def _tokenizer_sample(scans: list[Scan], per_domain: int) -> Iterator[str]:
    for scan in scans:
        taken = 0
        for doc, is_val in scan.documents():
            if taken >= per_domain:
                break
            if not is_val:
                yield doc
                taken += len(doc.encode("utf-8"))


def _make_tokenizer(scans: list[Scan], opts: BuildOptions) -> tuple[Tokenizer, dict[str, Any]]:
    if opts.tokenizer is not None:
        tok = load_tokenizer(opts.tokenizer)
        origin = str(opts.tokenizer)
    else:
        if not scans:
            raise DataError("--megatron domains need --tokenizer (the tokenizer.json they were built with)")
        log.info(
            "training byte-level BPE (vocab %d) on <= %d bytes per domain", opts.vocab_size, opts.tokenizer_sample_bytes
        )
        tok = train_bpe(_tokenizer_sample(scans, opts.tokenizer_sample_bytes), opts.vocab_size, opts.eos_token)
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


class SplitWriter:
    """Writes one split of one domain as shards `<split>_NNNNN.bin/.idx` of at most max_bytes each."""

    def __init__(self, root: Path, domain: str, split: str, dtype: np.dtype[Any], max_bytes: int) -> None:
        self.root, self.domain, self.split, self.dtype, self.max_bytes = root, domain, split, dtype, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._writer: IndexedWriter | None = None

    def add_document(self, ids: np.ndarray) -> None:
        """Append a document (its EOS included), opening a new shard when the current one is full."""
        if self._writer is not None and self._writer.num_tokens * self.dtype.itemsize >= self.max_bytes:
            self._close_shard()
        if self._writer is None:
            prefix = self.root / self.domain / f"{self.split}_{len(self.shards):05d}"
            self._writer = IndexedWriter(prefix, self.dtype)
        self._writer.add_document(ids)

    def _close_shard(self) -> None:
        assert self._writer is not None
        info = self._writer.close()
        prefix = self._writer.prefix.relative_to(self.root).as_posix()
        self.shards.append({"prefix": prefix, "docs": [0, info["num_docs"]]} | info)
        self._writer = None

    def close(self) -> dict[str, Any]:
        """The split's manifest entry: totals and the list of shards."""
        if self._writer is not None or not self.shards:
            if self._writer is None:
                self._writer = IndexedWriter(self.root / self.domain / f"{self.split}_00000", self.dtype)
            self._close_shard()
        return {
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "num_docs": sum(s["num_docs"] for s in self.shards),
            "shards": self.shards,
        }


def _batches(scan: Scan) -> Iterator[tuple[list[str], list[bool]]]:
    docs: list[str] = []
    flags: list[bool] = []
    size = 0
    for doc, is_val in scan.documents():
        docs.append(doc)
        flags.append(is_val)
        size += len(doc)
        if size >= ENCODE_BATCH_BYTES:
            yield docs, flags
            docs, flags, size = [], [], 0
    if docs:
        yield docs, flags


def _encoded(scan: Scan, pool: Executor | None, window: int) -> Iterator[tuple[list[np.ndarray], list[bool], int]]:
    """(token arrays, held-out flags, characters) per batch, in order, at most `window` batches in flight."""
    pending: deque[tuple[Future[list[np.ndarray]], list[bool], int]] = deque()
    for docs, flags in _batches(scan):
        chars = sum(len(d) for d in docs)
        if pool is None:
            yield encode_worker.encode(docs), flags, chars
            continue
        pending.append((pool.submit(encode_worker.encode, docs), flags, chars))
        if len(pending) >= window:
            future, flags_, chars_ = pending.popleft()
            yield future.result(), flags_, chars_
    while pending:
        future, flags_, chars_ = pending.popleft()
        yield future.result(), flags_, chars_


def _write_domain(scan: Scan, root: Path, tok_info: dict[str, Any], pool: Executor | None, opts: BuildOptions) -> dict:
    (root / scan.name).mkdir()
    dtype = token_dtype(tok_info["vocab_size"])
    writers = {s: SplitWriter(root, scan.name, s, dtype, opts.shard_bytes) for s in ("train", "val")}
    eos = np.asarray([tok_info["eos_id"]], dtype=np.int64)
    total = scan.selector.total_bytes
    with tqdm(total=total, desc=f"tokenize {scan.name}", unit="B", unit_scale=True, disable=None) as bar:
        for ids_list, flags, chars in _encoded(scan, pool, window=2 * max(1, opts.workers)):
            for ids, is_val in zip(ids_list, flags, strict=True):
                writers["val" if is_val else "train"].add_document(np.concatenate([ids, eos]))
            bar.update(chars)
    train, val = writers["train"].close(), writers["val"].close()
    log.info("domain '%s': %d train tokens, %d val tokens", scan.name, train["num_tokens"], val["num_tokens"])
    return {
        "source": scan.source.info.to_dict(),
        "documents": scan.num_docs,
        "bytes": total,
        "capped": scan.capped,
        "tokenizer_sha256": tok_info["sha256"],
        "train": train,
        "val": val,
    }


def _megatron_split(pieces: list[tuple[str, int, int]], ds_of: dict[str, IndexedDataset]) -> dict[str, Any]:
    shards: list[dict[str, Any]] = []
    for prefix, lo, hi in pieces:
        start, end = ds_of[prefix].doc_token_range(lo, hi)
        nbytes = (end - start) * ds_of[prefix].dtype.itemsize
        shards.append({"prefix": prefix, "docs": [lo, hi], "num_tokens": end - start, "num_docs": hi - lo})
        shards[-1] |= {"nbytes": nbytes, "sha256": None}
    num_tokens = sum(int(s["num_tokens"]) for s in shards)
    return {"num_tokens": num_tokens, "num_docs": sum(int(s["num_docs"]) for s in shards), "shards": shards}


def megatron_domain(name: str, prefixes: list[str], tok_info: dict[str, Any], opts: BuildOptions) -> dict[str, Any]:
    """Manifest entry of a domain read in place from Megatron prefixes; its last documents are val."""
    ds_of = {str(Path(p).resolve()): IndexedDataset(Path(p).resolve()) for p in prefixes}
    last = list(ds_of)[-1]
    n_last = ds_of[last].num_docs
    total = sum(ds.num_docs for ds in ds_of.values())
    n_val = min(max(1, round(opts.val_fraction * total)), n_last - 1)
    if n_val < 1:
        raise DataError(f"--megatron {name}: {last} needs >= 2 documents to hold out a validation split")
    train = [(p, 0, ds.num_docs) for p, ds in ds_of.items() if p != last] + [(last, 0, n_last - n_val)]
    top = max(int(ds.tokens.max()) if len(ds.tokens) else 0 for ds in ds_of.values())
    if top >= tok_info["vocab_size"]:
        raise DataError(f"--megatron {name}: token id {top} >= vocab size {tok_info['vocab_size']} of --tokenizer")
    origin = ",".join(prefixes)
    info = {"domain": name, "name": f"Megatron indexed datasets {origin}", "license": "unknown", "origin": origin}
    return {
        "source": info | {"notes": f"read in place; the last {n_val} documents of {last} are held out"},
        "documents": total,
        "bytes": sum(ds.bin_path.stat().st_size for ds in ds_of.values()),
        "capped": False,
        "tokenizer_sha256": tok_info["sha256"],
        "train": _megatron_split(train, ds_of),
        "val": _megatron_split([(last, n_last - n_val, n_last)], ds_of),
    }


def _check_options(opts: BuildOptions) -> None:
    names = [s.info.domain for s in opts.sources] + list(opts.megatron)
    if not names:
        raise DataError("no domains to build (give --input NAME=PATH or --demo)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"domain(s) {', '.join(dupes)} given more than once")
    if opts.out.exists() and not opts.force:
        raise DataError(f"output {opts.out} already exists; pass --force to replace it")
    if opts.megatron and opts.tokenizer is None:
        raise DataError("--megatron domains need --tokenizer (the tokenizer.json they were built with)")
    if opts.shard_bytes < 1:
        raise DataError(f"--shard-mb ({opts.shard_bytes / 2**20:g}) must be > 0")
    if not 0 <= opts.val_fraction < 0.5:
        raise DataError(f"--val-fraction ({opts.val_fraction}) must be in [0, 0.5)")


def _pool(opts: BuildOptions, tokenizer_path: Path) -> Executor | None:
    workers = opts.workers or os.cpu_count() or 1
    opts.workers = workers
    if workers == 1:
        encode_worker.init(str(tokenizer_path), in_worker=False)
        return None
    method = "fork" if "fork" in get_all_start_methods() else "spawn"  # fork: workers start in milliseconds
    return ProcessPoolExecutor(
        workers, mp_context=get_context(method), initializer=encode_worker.init, initargs=(str(tokenizer_path),)
    )


def _build_into(tmp: Path, opts: BuildOptions) -> dict[str, Any]:
    scans = [scan_domain(s, opts) for s in opts.sources]
    tok, tok_info = _make_tokenizer(scans, opts)
    tok.save(str(tmp / TOKENIZER_NAME))
    tok_info["sha256"] = file_sha256(tmp / TOKENIZER_NAME)
    domains: dict[str, Any] = {}
    pool = _pool(opts, tmp / TOKENIZER_NAME) if scans else None
    try:
        for scan in scans:
            domains[scan.name] = _write_domain(scan, tmp, tok_info, pool, opts)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for name, prefixes in opts.megatron.items():
        domains[name] = megatron_domain(name, prefixes, tok_info, opts)
    manifest: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": opts.seed,
        "max_bytes_per_domain": opts.max_bytes,
        "val_fraction": opts.val_fraction,
        "val_min_bytes": opts.val_min_bytes,
        "tokenizer": tok_info,
        "domains": domains,
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
