"""Your own text as a domain: ``--input NAME=PATH`` or a Hugging Face dataset.

Accepted PATH forms and what one document is:

* a directory: every ``.txt``, ``.md`` and ``.py`` file below it (sorted by path) is one document;
* a ``.txt`` / ``.md`` file: documents are separated by one or more blank lines;
* a ``.jsonl`` file: one JSON object per line, the document is its ``text`` field (``--text-field``);
* a ``.parquet`` / ``.arrow`` / ``.json`` / ``.csv`` file: rows streamed through HF ``datasets``, the
  document is the ``text`` field (``--text-field``);
* ``hf:NAME_OR_PATH[#SPLIT]``: a dataset loaded with ``datasets.load_dataset`` (streamed; split
  ``train`` by default). A local ``.json``/``.jsonl``/``.parquet``/``.csv``/``.txt`` path is loaded
  with the matching ``datasets`` builder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from moe_train.data.errors import DataError
from moe_train.data.sources import SourceInfo, TextSource, check_domain_name

TEXT_SUFFIXES = (".txt", ".md", ".py")
HF_PREFIX = "hf:"
_HF_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".txt": "text",
}
_HF_FILES = (".parquet", ".arrow", ".json", ".csv")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def parse_input_spec(spec: str) -> tuple[str, str]:
    """'NAME=PATH' → (name, path); errors name the spec."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise DataError(f"--input {spec!r} must look like NAME=PATH")
    return check_domain_name(name, f"--input {spec!r}"), path


def _directory_documents(root: Path) -> Iterator[str]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield text


def split_blank_lines(text: str) -> list[str]:
    """Documents of a .txt file: blocks separated by one or more blank lines."""
    return [block.strip("\n") for block in _BLANK_LINES.split(text) if block.strip()]


def _text_file_documents(path: Path) -> Iterator[str]:
    """Blank-line separated documents, streamed line by line (memory: one document)."""
    lines: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                lines.append(line)
            elif lines:
                yield from split_blank_lines("".join(lines))
                lines = []
    if lines:
        yield from split_blank_lines("".join(lines))


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno} has no string field {field!r}")
            if text.strip():
                yield text


def hf_documents(name_or_path: str, split: str = "train", field: str = "text") -> Iterator[str]:
    """Documents of a Hugging Face dataset (hub name, local dataset dir or data file), streamed."""
    import datasets  # local import: `datasets` is slow to import and only needed here

    suffix = Path(name_or_path).suffix.lower()
    kwargs: dict[str, Any] = {"split": split, "streaming": True}
    if Path(name_or_path).is_file() and suffix in _HF_BUILDERS:
        args: tuple[str, ...] = (_HF_BUILDERS[suffix],)
        kwargs["data_files"] = name_or_path
    else:
        args = (name_or_path,)
    try:
        dataset: Iterable[dict[str, Any]] = datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types; report them all the same way
        raise DataError(f"hf:{name_or_path}: load_dataset failed ({type(exc).__name__}: {exc})") from None
    for row in dataset:
        text = row.get(field)
        if not isinstance(text, str):
            raise DataError(f"hf:{name_or_path} ({split}) has no string field {field!r}")
        if text.strip():
            yield text


def _hf_source(name: str, spec: str, field: str, license: str) -> TextSource:
    target, _, split = spec[len(HF_PREFIX) :].partition("#")
    split = split or "train"
    info = SourceInfo(name, f"Hugging Face dataset {target} ({split})", license, f"hf:{target}#{split}")
    return TextSource(info, lambda: hf_documents(target, split, field))


def input_source(spec: str, field: str = "text", license: str = "unknown (user-provided)") -> TextSource:
    """The TextSource for one ``--input NAME=PATH`` spec; errors name the spec and path."""
    name, raw = parse_input_spec(spec)
    if raw.startswith(HF_PREFIX):
        return _hf_source(name, raw, field, license)
    path = Path(raw).expanduser()
    info = SourceInfo(name, f"local files {path}", license, str(path))
    if path.is_dir():
        return TextSource(info, lambda: _directory_documents(path))
    if not path.is_file():
        raise DataError(f"--input {name}: {path} does not exist")
    if path.suffix == ".jsonl":
        return TextSource(info, lambda: _jsonl_documents(path, field))
    if path.suffix in (".txt", ".md"):
        return TextSource(info, lambda: _text_file_documents(path))
    if path.suffix in _HF_FILES:
        return TextSource(info, lambda: hf_documents(str(path), "train", field))
    raise DataError(f"--input {name}: {path} must be a directory or a .txt/.md/.jsonl/{'/'.join(_HF_FILES)} file")
