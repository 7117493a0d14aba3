"""An index's durable files: a start-up shortcut, never the truth.

The index is derived data. Its files are trusted only when their sizes and checksums match the manifest and
their fingerprint (the (record id, embedding id) pairs they hold) equals the database's; otherwise the index is
rebuilt from the stored vectors, with no encoder involved. Files are written under names private to the writing
process and committed by renaming the manifest over the old one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import secrets
import zlib
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger("llmatch.index")

FILE_FORMAT = 2


def fingerprint(pairs: Any, embedding_ids: np.ndarray | None = None) -> str:
    """Identity of an index's content: its (record id, embedding id) pairs in record id order.

    Takes either two arrays (record ids, embedding ids) or an iterable of pairs."""
    if embedding_ids is None:
        array = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
        record_ids, embedding_ids = array[:, 0], array[:, 1]
    else:
        record_ids = np.asarray(pairs, dtype=np.int64)
        embedding_ids = np.asarray(embedding_ids, dtype=np.int64)
        if record_ids.size > 1 and not bool(np.all(record_ids[1:] > record_ids[:-1])):
            order = np.argsort(record_ids, kind="stable")
            record_ids, embedding_ids = record_ids[order], embedding_ids[order]
    digest = hashlib.sha256(b"llmatch-index-v2")
    digest.update(np.stack([record_ids, embedding_ids], axis=1).astype("<i8").tobytes())
    return digest.hexdigest()


class IndexFiles:
    """One generation of an index's files, named privately to this process until ``commit``."""

    def __init__(self, path: Path):
        self.directory = path.parent
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stem = path.name.removesuffix(".faiss")
        generation = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.manifest_path = path.with_suffix(".json")
        self.index_file = self.directory / f"{self.stem}.{generation}.faiss"
        self.ids_file = self.directory / f"{self.stem}.{generation}.ids.npy"

    def write_index(self, cpu: faiss.Index) -> None:
        faiss.write_index(cpu, str(self.index_file))

    def commit(self, ids: np.ndarray, manifest: dict[str, Any]) -> None:
        """Write the id file, fsync both, then rename the manifest over the old one; the files it replaced are
        deleted."""
        manifest = {**manifest, "format": FILE_FORMAT}
        with self.ids_file.open("wb") as handle:
            np.save(handle, ids, allow_pickle=False)
        for name, file in (("index", self.index_file), ("ids", self.ids_file)):
            _fsync(file)
            manifest[f"{name}_file"] = file.name
            manifest[f"{name}_bytes"], manifest[f"{name}_crc32"] = _size_and_crc(file)
        replaced = _data_files(self.manifest_path)
        _write_atomically(self.manifest_path, json.dumps(manifest).encode())
        for file in replaced - {self.index_file, self.ids_file}:
            file.unlink(missing_ok=True)
        _remove_orphans(self.directory, self.stem)


def read(path: Path, expected_fingerprint: str) -> tuple[dict[str, Any], faiss.Index, np.ndarray] | None:
    """(manifest, FAISS index, ids (2, n)) of the saved index, or None when it is missing, damaged or not the
    database's content."""
    if not path.with_suffix(".json").exists():
        log.info("no index file %s yet: building it", path.with_suffix(".json").name)
        return None
    try:
        manifest = json.loads(path.with_suffix(".json").read_text())
        if manifest.get("format") != FILE_FORMAT or manifest["fingerprint"] != expected_fingerprint:
            return None
        files = {}
        for name in ("index", "ids"):
            file = path.parent / manifest[f"{name}_file"]
            if _size_and_crc(file) != (manifest[f"{name}_bytes"], manifest[f"{name}_crc32"]):
                raise ValueError(f"{file.name} does not match its manifest (truncated or overwritten)")
            files[name] = file
        ids = np.load(files["ids"], allow_pickle=False)
        cpu = faiss.read_index(str(files["index"]))
        if ids.shape != (2, manifest["size"]) or cpu.ntotal != manifest["size"] or cpu.d != manifest["dim"]:
            raise ValueError("index and id files disagree")
        if fingerprint(ids[0], ids[1]) != expected_fingerprint:
            return None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        log.warning("index file %s unusable (%s): rebuilding", path, error)
        return None
    return manifest, cpu, ids


def delete(path: Path) -> None:
    """Remove an index's manifest and the files it names."""
    manifest_path = path.with_suffix(".json")
    for file in _data_files(manifest_path):
        file.unlink(missing_ok=True)
    manifest_path.unlink(missing_ok=True)
    path.unlink(missing_ok=True)  # a file of the earlier single-file format


def _size_and_crc(file: Path) -> tuple[int, int]:
    crc = 0
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return file.stat().st_size, crc


def _fsync(file: Path) -> None:
    with file.open("rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a name private to this process, fsync, rename over ``path``, fsync the directory."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    _fsync_directory(path.parent)


def _data_files(manifest_path: Path) -> set[Path]:
    """The data files a manifest names (none when it is missing or unreadable)."""
    try:
        manifest = json.loads(manifest_path.read_text())
        return {manifest_path.parent / manifest[f"{name}_file"] for name in ("index", "ids")}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _remove_orphans(directory: Path, stem: str) -> None:
    """Delete data files of ``stem`` left by processes that died before committing them."""
    pattern = re.compile(rf"{re.escape(stem)}(?:\.json)?\.(\d+)-[0-9a-f]+\.(?:faiss|ids\.npy|tmp)")
    keep = _data_files(directory / f"{stem}.json")
    for file in directory.glob(f"{glob.escape(stem)}.*"):
        match = pattern.fullmatch(file.name)
        if match and file not in keep and not _process_alive(int(match.group(1))):
            file.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own uncommitted files are never in use between saves
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
