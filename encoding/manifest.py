"""The manifest of a trained encoder folder: what to load, and how it was trained.

``llmatch train`` writes ``manifest.json`` into every stage folder. Its ``encoder`` block is an encoder
specification whose paths are relative to the folder, so a trained folder can be moved or mounted elsewhere
and still be named by a dataset's encoder configuration (``LLMATCH_ENCODERS='{"abt": "/models/abt"}'``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "llmatch-trained-encoder/1"


class ManifestError(ValueError):
    """A folder that is not a trained encoder, or whose manifest cannot be read."""


def is_trained_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / MANIFEST_FILE).is_file()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder).expanduser() / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{folder} is not a trained encoder folder (no {MANIFEST_FILE})") from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON: {error}") from None
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("encoder"), dict):
        raise ManifestError(f"{path} is not an llmatch trained-encoder manifest (format {MANIFEST_FORMAT})")
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, **manifest}, indent=2) + "\n")
    return path


def encoder_options(folder: str | Path) -> dict[str, Any]:
    """The encoder specification of a trained folder, with its paths made absolute."""
    root = Path(folder).expanduser().resolve()
    options = dict(read_manifest(root)["encoder"])
    options["model"] = _resolve(root, options["model"])
    adapter = options.get("adapter")
    if isinstance(adapter, list):
        options["adapter"] = [_resolve(root, path) for path in adapter]
    elif adapter:
        options["adapter"] = _resolve(root, adapter)
    return options


def relative_path(path: str | Path, folder: Path) -> str:
    """``path`` written relative to ``folder`` when it is a local path (hub ids are kept as they are)."""
    candidate = Path(path).expanduser()
    if not candidate.exists():
        return str(path)
    return os.path.relpath(candidate.resolve(), folder.resolve())


def _resolve(root: Path, path: str) -> str:
    """A manifest path made absolute; a name that is neither absolute nor present is a hub id."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    local = (root / candidate).resolve()
    return str(local) if local.exists() or path.startswith(".") else path
