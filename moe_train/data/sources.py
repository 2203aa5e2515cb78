"""A text source: where a domain's documents come from, under which licence, and how to read them."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from moe_train.data.errors import DataError

DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class SourceInfo:
    """Provenance of one domain, recorded in manifest.json and SOURCES.md."""

    domain: str
    """Domain name (also the shard directory name)."""
    name: str
    """Human-readable description of the source."""
    license: str
    """Licence of the text (SPDX id where one exists)."""
    origin: str
    """Where it came from: package==version, a path or a dataset name."""
    notes: str = ""
    """How the documents were cut out of the source, attribution notices."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class TextSource:
    """A domain's documents: `documents()` yields one string per document, in a fixed order."""

    info: SourceInfo
    documents: Callable[[], Iterator[str]]


def check_domain_name(name: str, where: str) -> str:
    """Domain names become directory names: letters, digits, '_', '-', '.'."""
    if not DOMAIN_NAME.match(name):
        raise DataError(f"{where}: domain name {name!r} must match {DOMAIN_NAME.pattern}")
    return name
