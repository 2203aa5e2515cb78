"""manifest.json (machine-readable) and SOURCES.md (the licence record) of a data directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_train.data.errors import DataError

MANIFEST_NAME = "manifest.json"
SOURCES_NAME = "SOURCES.md"
TOKENIZER_NAME = "tokenizer.json"
FORMAT = "moe_train.data/2"


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write <root>/manifest.json (the format tag first)."""
    (root / MANIFEST_NAME).write_text(json.dumps({"format": FORMAT} | manifest, indent=2) + "\n")


def build_hint(root: Path) -> str:
    """The command that (re)builds a data directory."""
    return f"run `moe-train data build --out {root}`"


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Load and sanity-check <root>/manifest.json; errors name the path and say how to build it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.dir {root} does not exist; {build_hint(root)}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"data.dir {root} has no {MANIFEST_NAME}; {build_hint(root)}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc.__class__.__name__}); {build_hint(root)}") from None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("moe_train.data/"):
        raise DataError(f"{path} is not a moe_train data manifest; {build_hint(root)}")
    if manifest["format"] != FORMAT:
        raise DataError(
            f"{path} has format {manifest['format']}, this moe_train reads {FORMAT} (Megatron shards); "
            f"{build_hint(root)} --force"
        )
    if not isinstance(manifest.get("domains"), dict) or not manifest["domains"]:
        raise DataError(f"{path} lists no domains; {build_hint(root)}")
    return manifest


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def sources_markdown(manifest: dict[str, Any]) -> str:
    """The SOURCES.md text: one row per domain with its licence and origin."""
    lines = [
        "# Sources and licences",
        "",
        "Text in this directory was taken from the sources below; each keeps its own licence.",
        "",
        "| domain | source | licence | origin | documents | train tokens | val tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, dom in manifest["domains"].items():
        src = dom["source"]
        cells = [name, src["name"], src["license"], src["origin"], dom["documents"]]
        cells += [dom["train"]["num_tokens"], dom["val"]["num_tokens"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "## Notes", ""]
    for name, dom in manifest["domains"].items():
        notes = dom["source"].get("notes") or "-"
        lines.append(f"- **{name}**: {notes}")
    tok = manifest["tokenizer"]
    lines += ["", "## Tokenizer", "", f"{tok['origin']}; vocab {tok['vocab_size']}, EOS {tok['eos_token']!r}."]
    lines += ([f"Note: {tok['vocab_note']}."] if tok.get("vocab_note") else []) + [""]
    return "\n".join(lines)


def write_sources_md(root: Path, manifest: dict[str, Any]) -> None:
    """Write <root>/SOURCES.md."""
    (root / SOURCES_NAME).write_text(sources_markdown(manifest))
