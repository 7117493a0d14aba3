"""Every loaded index of a process, keyed by (dataset id, source), with its policy and when its files were
written."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from matching import index_files
from matching.errors import IndexBehind
from matching.index import VectorIndex
from matching.index_policy import IndexPolicy

log = logging.getLogger("llmatch.index")

IndexKey = tuple[int, str]  # (dataset id, source)


class IndexRegistry:
    """Every loaded index of this process, keyed by (dataset id, source). Searches go through
    ``matching.neighbours``, which adds the database's stale-hit check and the target-source rule."""

    def __init__(self, directory: Path, use_gpu: bool = False, policy: IndexPolicy | None = None):
        self.directory = directory
        self.use_gpu = use_gpu
        self.policy = policy or IndexPolicy()
        self.dataset_policies: dict[int, IndexPolicy] = {}  # per dataset id, where one overrides ``policy``
        # Per dataset id: the encoder (``Dataset.serving_encoder``) its indexes hold vectors of, as of the last
        # applied change. A request that reads another one from the database is ahead of this process's indexes
        # (a new encoder version was switched to and not yet applied here): it catches up before searching.
        self.serving_encoders: dict[int, str] = {}
        self._indexes: dict[IndexKey, VectorIndex] = {}
        self._saved: dict[IndexKey, tuple[int, float]] = {}  # version written and when (monotonic)
        self._lock = threading.RLock()
        self._save_lock = threading.Lock()
        self.loaded = False

    def check_current(self, dataset_id: int, serving_encoder: str) -> None:
        """Raise ``IndexBehind`` when this process's indexes of the dataset hold vectors of another encoder than
        ``serving_encoder`` (what the database names now): a switch to a new version is not applied here yet."""
        held = self.serving_encoders.get(dataset_id)
        if held is not None and held != serving_encoder:
            raise IndexBehind(f"the indexes of dataset {dataset_id} hold vectors of {held!r}, not {serving_encoder!r}")

    def path(self, key: IndexKey) -> Path:
        dataset_id, source = key
        return self.directory / f"{dataset_id}-{source}.faiss"

    def policy_for(self, key: IndexKey) -> IndexPolicy:
        return self.dataset_policies.get(key[0], self.policy)

    def set_policy(self, dataset_id: int, policy: IndexPolicy | None) -> list[IndexKey]:
        """Use ``policy`` for the dataset's indexes (None: the process's policy); its loaded indexes switch to it
        at once. Returns the keys of the indexes whose FAISS structure was rebuilt."""
        with self._lock:
            if policy is None or policy == self.policy:
                self.dataset_policies.pop(dataset_id, None)
            else:
                self.dataset_policies[dataset_id] = policy
            effective = self.policy_for((dataset_id, ""))
            loaded = [(key, index) for key, index in self._indexes.items() if key[0] == dataset_id]
        rebuilt = [key for key, index in loaded if index.set_policy(effective)]
        if rebuilt:
            log.info("dataset %d now indexed with %s", dataset_id, effective)
        return rebuilt

    def forget_policies(self, keep: set[int]) -> None:
        """Drop the policies of datasets not in ``keep`` (deleted ones)."""
        with self._lock:
            for dataset_id in set(self.dataset_policies) - keep:
                del self.dataset_policies[dataset_id]

    def get(self, key: IndexKey) -> VectorIndex | None:
        with self._lock:
            return self._indexes.get(key)

    def put(self, key: IndexKey, index: VectorIndex, saved: bool = False) -> None:
        """Hold ``index`` for ``key``; ``saved`` when its files already hold exactly this content."""
        with self._lock:
            self._indexes[key] = index
            if saved:
                self._saved[key] = (index.version, time.monotonic())
            else:
                self._saved.pop(key, None)

    def keys(self) -> list[IndexKey]:
        with self._lock:
            return list(self._indexes)

    def size(self, key: IndexKey) -> int:
        """Vectors the index of ``key`` holds (0 when none is loaded)."""
        index = self.get(key)
        return 0 if index is None else index.size

    def record_ids(self, key: IndexKey) -> np.ndarray:
        """The record ids the index of ``key`` holds, sorted (empty when none is loaded)."""
        index = self.get(key)
        return np.empty(0, dtype=np.int64) if index is None else index.record_ids()

    def upsert(self, key: IndexKey, record_ids: np.ndarray, embedding_ids: np.ndarray, vectors: np.ndarray) -> None:
        with self._lock:
            index = self._indexes.get(key)
            if index is None or index.dim != vectors.shape[1]:
                index = self._indexes[key] = VectorIndex(vectors.shape[1], self.use_gpu, self.policy_for(key))
            index.upsert(record_ids, embedding_ids, vectors)

    def remove(self, key: IndexKey, record_ids: Iterable[int]) -> None:
        index = self.get(key)
        if index is not None:
            index.remove(record_ids)

    def embedding_ids(self, key: IndexKey, record_ids: np.ndarray) -> np.ndarray:
        """The embedding id the index holds for each record id, -1 where it holds none (e.g. to drop stale hits)."""
        index = self.get(key)
        if index is None:
            return np.full(len(record_ids), -1, dtype=np.int64)
        return index.embedding_ids_of(record_ids)

    def drop_dataset(self, dataset_id: int) -> None:
        with self._save_lock, self._lock:
            self.dataset_policies.pop(dataset_id, None)
            for key in [k for k in self._indexes if k[0] == dataset_id]:
                del self._indexes[key]
                self._saved.pop(key, None)
                index_files.delete(self.path(key))

    def save(self, key: IndexKey) -> None:
        """Write one index's files now."""
        with self._save_lock:
            index = self.get(key)
            if index is None:
                return
            version = index.version
            index.save(self.path(key), {"dataset_id": key[0], "source": key[1]})
            with self._lock:
                if self._indexes.get(key) is index:
                    self._saved[key] = (version, time.monotonic())

    def save_all(self) -> None:
        for key in self.keys():
            self.save(key)

    def save_changed(self, min_interval: float = 0.0) -> list[IndexKey]:
        """Save every index changed since its files were written, each at most once per ``min_interval`` seconds."""
        saved = []
        now = time.monotonic()
        for key in self.keys():
            index = self.get(key)
            version, when = self._saved.get(key, (-1, float("-inf")))
            if index is not None and index.version != version and now - when >= min_interval:
                self.save(key)
                saved.append(key)
        return saved
