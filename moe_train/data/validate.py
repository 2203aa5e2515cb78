"""Checks of data.* against the data directory, run by the trainer before any work starts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from moe_train.config import Config
from moe_train.data.errors import DataError
from moe_train.data.manifest import TOKENIZER_NAME, read_manifest
from moe_train.data.shards import IndexedDataset, TokenStream, file_sha256
from moe_train.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


def tokenizer_path(cfg: Config) -> Path:
    """data.tokenizer if set, else <data.dir>/tokenizer.json."""
    return Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(cfg.data.dir) / TOKENIZER_NAME


def selected_domains(cfg: Config, manifest: dict[str, Any]) -> list[str]:
    """data.domains (checked against the directory) or every domain of the manifest, in its order."""
    available = list(manifest["domains"])
    if cfg.data.domains is None:
        return available
    for name in cfg.data.domains:
        if name not in available:
            raise DataError(
                f"data.domains: unknown domain '{name}' in {cfg.data.dir} (available: {', '.join(available)})"
            )
    return list(cfg.data.domains)


def _shard_prefix(root: Path, entry: dict[str, Any]) -> Path:
    prefix = Path(entry["prefix"])
    return prefix if prefix.is_absolute() else root / prefix


def open_split(
    root: Path, manifest: dict[str, Any], domain: str, split: str, verify_checksum: bool = False
) -> TokenStream:
    """The token stream of one split of one domain: its shards, each checked against the manifest."""
    pieces = []
    for entry in manifest["domains"][domain][split]["shards"]:
        ds = IndexedDataset(_shard_prefix(root, entry))
        lo, hi = entry["docs"]
        start, end = ds.doc_token_range(lo, hi)
        if end - start != entry["num_tokens"]:
            raise DataError(
                f"shard {ds.bin_path} holds {end - start} tokens in documents [{lo}, {hi}), the manifest says "
                f"{entry['num_tokens']}; rebuild {root}"
            )
        if verify_checksum and entry.get("sha256") and file_sha256(ds.bin_path) != entry["sha256"]:
            raise DataError(f"shard {ds.bin_path} is corrupt: sha256 differs from {root / 'manifest.json'}")
        pieces.append((ds, lo, hi))
    return TokenStream(pieces, f"{domain}/{split}")


def open_shard(root: Path, domain: str, split: str, verify_checksum: bool = False) -> TokenStream:
    """open_split with the manifest of root."""
    return open_split(root, read_manifest(root), domain, split, verify_checksum)


def _check_tokenizer(cfg: Config, manifest: dict[str, Any]) -> None:
    path = tokenizer_path(cfg)
    if not path.is_file():
        where = "data.tokenizer" if cfg.data.tokenizer else f"data.dir {cfg.data.dir}"
        raise DataError(f"tokenizer {path} does not exist ({where}); run `moe-train data build --out {cfg.data.dir}`")
    vocab = load_tokenizer(path).get_vocab_size()
    if vocab > cfg.model.vocab_size:
        raise DataError(
            f"tokenizer {path} has vocab size {vocab} > model.vocab_size ({cfg.model.vocab_size}); "
            f"set model.vocab_size >= {vocab}"
        )
    built_with = manifest["tokenizer"].get("sha256")
    if cfg.data.tokenizer and built_with and file_sha256(path) != built_with:
        raise DataError(f"data.tokenizer {path} is not the tokenizer {cfg.data.dir} was built with")


def _check_domain(cfg: Config, root: Path, manifest: dict[str, Any], domain: str) -> None:
    need = cfg.train.seq_len + 1
    want, got = manifest["tokenizer"].get("sha256"), manifest["domains"][domain].get("tokenizer_sha256")
    if want and got != want:
        raise DataError(
            f"domain '{domain}' in {root} was tokenised with tokenizer {str(got)[:12]}, the directory's "
            f"{TOKENIZER_NAME} is {want[:12]}; rebuild the domain with that tokenizer (--tokenizer)"
        )
    for split in SPLITS:
        shard = open_split(root, manifest, domain, split, verify_checksum=cfg.data.verify_checksums)
        if shard.num_tokens < need:
            raise DataError(
                f"domain '{domain}' in {root} has {shard.num_tokens} {split} tokens, fewer than "
                f"train.seq_len + 1 ({need}); add text to it or leave it out of data.domains"
            )


def validate_data(cfg: Config) -> None:
    """Raise DataError (one line naming the path or domain) if training could not read its data."""
    if cfg.data.mock:
        return
    root = Path(cfg.data.dir)
    manifest = read_manifest(root)
    _check_tokenizer(cfg, manifest)
    domains = selected_domains(cfg, manifest)
    for domain in domains:
        _check_domain(cfg, root, manifest, domain)
    log.info("data %s: domains %s", root, ", ".join(domains))
