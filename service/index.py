"""FAISS indexes, one per (dataset, source): inner product over L2-normalised vectors (= cosine).

The indexes are derived data. Their files are a start-up shortcut, trusted only when their fingerprint
(the (record id, embedding id) pairs they hold) equals the database's; otherwise they are rebuilt from
the stored vectors, with no encoder involved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger("llmatch.index")

IndexKey = tuple[int, str]  # (dataset id, source)


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def fingerprint(pairs: Iterable[tuple[int, int]]) -> str:
    """Identity of an index's content: its sorted (record id, embedding id) pairs."""
    digest = hashlib.sha256()
    for record_id, embedding_id in sorted(pairs):
        digest.update(f"{record_id}:{embedding_id};".encode())
    return digest.hexdigest()


class VectorIndex:
    """A mutable flat inner-product index keyed by record id, with an optional GPU copy for search."""

    def __init__(self, dim: int, use_gpu: bool = False):
        self.dim = dim
        self.cpu = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.embedding_ids: dict[int, int] = {}  # record id -> embedding id it holds
        self._use_gpu = use_gpu
        self._gpu = None
        self._gpu_stale = True
        self._lock = threading.RLock()

    @property
    def size(self) -> int:
        return int(self.cpu.ntotal)

    def upsert(self, record_ids: np.ndarray, embedding_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors, replacing those of records already present."""
        with self._lock:
            self._remove_locked([int(i) for i in record_ids if int(i) in self.embedding_ids])
            self.cpu.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), record_ids.astype(np.int64))
            self.embedding_ids.update(zip(map(int, record_ids), map(int, embedding_ids), strict=True))
            self._gpu_stale = True

    def remove(self, record_ids: Iterable[int]) -> None:
        with self._lock:
            self._remove_locked([i for i in record_ids if i in self.embedding_ids])

    def _remove_locked(self, record_ids: list[int]) -> None:
        if not record_ids:
            return
        self.cpu.remove_ids(np.asarray(record_ids, dtype=np.int64))
        for record_id in record_ids:
            del self.embedding_ids[record_id]
        self._gpu_stale = True

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, record ids) per query row; missing slots have id -1."""
        with self._lock:
            index = self._search_index()
            k = min(k, max(self.size, 1))
            return index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)

    def _search_index(self):
        if not self._use_gpu:
            return self.cpu
        if self._gpu_stale:
            # GPU indexes cannot remove ids: search a GPU copy refreshed from the CPU index after changes.
            self._gpu = faiss.index_cpu_to_gpu(_gpu_resources(), 0, self.cpu)
            self._gpu_stale = False
        return self._gpu

    def fingerprint(self) -> str:
        with self._lock:
            return fingerprint(self.embedding_ids.items())

    def save(self, path: Path, meta: dict) -> None:
        """Write the index and its manifest (written last, so a torn write is detected as stale)."""
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            faiss.write_index(self.cpu, str(tmp))
            tmp.replace(path)
            manifest = {
                **meta,
                "dim": self.dim,
                "fingerprint": self.fingerprint(),
                "embedding_ids": {str(k): v for k, v in self.embedding_ids.items()},
            }
            path.with_suffix(".json").write_text(json.dumps(manifest))

    @classmethod
    def load(cls, path: Path, expected_fingerprint: str, use_gpu: bool = False) -> VectorIndex | None:
        """The saved index, or None when it is missing, unreadable or not the database's content."""
        try:
            manifest = json.loads(path.with_suffix(".json").read_text())
            if manifest["fingerprint"] != expected_fingerprint:
                return None
            cpu = faiss.read_index(str(path))
            embedding_ids = {int(k): int(v) for k, v in manifest["embedding_ids"].items()}
            if cpu.ntotal != len(embedding_ids) or cpu.d != manifest["dim"]:
                return None
            if fingerprint(embedding_ids.items()) != expected_fingerprint:
                return None
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            log.warning("index file %s unusable (%s): rebuilding", path, error)
            return None
        index = cls(int(manifest["dim"]), use_gpu)
        index.cpu = cpu
        index.embedding_ids = embedding_ids
        return index


_GPU_RESOURCES = None


def _gpu_resources():
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


@dataclass(frozen=True)
class SearchHit:
    record_id: int
    score: float


class IndexRegistry:
    """Every loaded index of this process, keyed by (dataset id, source)."""

    def __init__(self, directory: Path, use_gpu: bool = False):
        self.directory = directory
        self.use_gpu = use_gpu
        self._indexes: dict[IndexKey, VectorIndex] = {}
        self._lock = threading.RLock()
        self.loaded = False

    def path(self, key: IndexKey) -> Path:
        dataset_id, source = key
        return self.directory / f"{dataset_id}-{source}.faiss"

    def get(self, key: IndexKey) -> VectorIndex | None:
        with self._lock:
            return self._indexes.get(key)

    def put(self, key: IndexKey, index: VectorIndex) -> None:
        with self._lock:
            self._indexes[key] = index

    def keys(self) -> list[IndexKey]:
        with self._lock:
            return list(self._indexes)

    def upsert(self, key: IndexKey, record_ids: np.ndarray, embedding_ids: np.ndarray, vectors: np.ndarray) -> None:
        with self._lock:
            index = self._indexes.get(key)
            if index is None or index.dim != vectors.shape[1]:
                index = self._indexes[key] = VectorIndex(vectors.shape[1], self.use_gpu)
            index.upsert(record_ids, embedding_ids, vectors)

    def remove(self, key: IndexKey, record_ids: Iterable[int]) -> None:
        index = self.get(key)
        if index is not None:
            index.remove(record_ids)

    def drop_dataset(self, dataset_id: int) -> None:
        with self._lock:
            for key in [k for k in self._indexes if k[0] == dataset_id]:
                del self._indexes[key]
                for suffix in (".faiss", ".json"):
                    self.path(key).with_suffix(suffix).unlink(missing_ok=True)

    def search(self, key: IndexKey, vector: np.ndarray, k: int) -> list[SearchHit]:
        index = self.get(key)
        if index is None or index.size == 0:
            return []
        scores, ids = index.search(vector.reshape(1, -1), k)
        return [SearchHit(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]

    def save_all(self) -> None:
        for key in self.keys():
            index = self.get(key)
            if index is not None:
                index.save(self.path(key), {"dataset_id": key[0], "source": key[1]})
