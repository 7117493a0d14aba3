"""The in-memory index of one (dataset, source): inner product over L2-normalised vectors (= cosine).

FAISS holds the vectors with record ids as labels, and two sorted numpy arrays map record ids to the embedding
ids they hold: nothing per vector lives in a Python object. Its structure follows an ``IndexPolicy``
(``index_policy``), its files are written and checked by ``index_files``, and an optional GPU copy
(``index_gpu``) answers its searches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from matching import index_files
from matching.index_files import fingerprint
from matching.index_gpu import GpuCopies, GpuCopy
from matching.index_policy import (
    MIN_APPROXIMATE_SIZE,
    RETRAIN_GROWTH,
    IndexPolicy,
    new_faiss_index,
    nlist_for,
    storage_of,
    tune_nprobe,
)

log = logging.getLogger("llmatch.index")

# Vectors per add call when filling an index: each call assigns its chunk to lists in one batched search.
ADD_CHUNK = 65_536


@contextmanager
def single_threaded() -> Iterator[None]:
    """FAISS calls of this thread on one OpenMP thread: a single query gains little from two, and under
    concurrent requests or other load the threads' barriers cost several times the search itself."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # per calling thread (an OpenMP ICV): other threads keep theirs
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


class VectorIndex:
    """A mutable inner-product index keyed by record id, with an optional GPU copy for search."""

    def __init__(
        self, dim: int, use_gpu: bool = False, policy: IndexPolicy | None = None, gpu: GpuCopies | None = None
    ):
        self.dim = dim
        self.policy = policy or IndexPolicy()
        self.structure = "flat"
        self.trained_size = 0  # vectors an inverted file was built for
        self.tuned_nprobe = 0  # the nprobe an inverted file's build found for the policy's target recall
        self.cpu = new_faiss_index(dim, "flat", self.policy)
        self._record_ids = np.empty(0, dtype=np.int64)  # sorted
        self._embedding_ids = np.empty(0, dtype=np.int64)  # the embedding each record's vector came from
        self.version = 0  # bumped by every change, so a save knows what it wrote
        self._use_gpu = use_gpu
        self._gpu = GpuCopy(dim, gpu)  # searched instead of ``cpu`` when use_gpu
        self._lock = threading.RLock()

    @classmethod
    def build(
        cls,
        record_ids: np.ndarray,
        embedding_ids: np.ndarray,
        vectors: np.ndarray,
        use_gpu: bool = False,
        policy: IndexPolicy | None = None,
        timings: dict[str, float] | None = None,
    ) -> VectorIndex:
        """An index holding exactly these vectors, its structure chosen by their number; ``timings`` (when given)
        receives the seconds spent training (``train_s``) and adding (``add_s``)."""
        index = cls(vectors.shape[1], use_gpu, policy)
        index._fill(*_last_per_record(record_ids, embedding_ids, vectors), timings=timings)
        return index

    @property
    def size(self) -> int:
        return int(self.cpu.ntotal)

    def upsert(self, record_ids: np.ndarray, embedding_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors, replacing those of records already present."""
        record_ids, embedding_ids, vectors = _last_per_record(record_ids, embedding_ids, vectors)
        with self._lock:
            positions = self._positions(record_ids)
            present = positions >= 0
            if present.any():
                self.cpu.remove_ids(faiss.IDSelectorBatch(record_ids[present]))
            self.cpu.add_with_ids(vectors, record_ids)
            self._gpu.upsert(record_ids, vectors, present)
            self._embedding_ids[positions[present]] = embedding_ids[present]
            new_ids, new_embedding_ids = record_ids[~present], embedding_ids[~present]
            order = np.argsort(new_ids)
            at = np.searchsorted(self._record_ids, new_ids[order])
            self._record_ids = np.insert(self._record_ids, at, new_ids[order])
            self._embedding_ids = np.insert(self._embedding_ids, at, new_embedding_ids[order])
            self._changed()
            if self._needs_restructure():
                self._restructure()

    def remove(self, record_ids: Iterable[int]) -> None:
        ids = np.unique(np.fromiter((int(i) for i in record_ids), dtype=np.int64))
        with self._lock:
            positions = self._positions(ids)
            positions = positions[positions >= 0]
            if positions.size == 0:
                return
            self.cpu.remove_ids(faiss.IDSelectorBatch(self._record_ids[positions]))
            self._gpu.out_of_date(self._record_ids[positions])
            self._record_ids = np.delete(self._record_ids, positions)
            self._embedding_ids = np.delete(self._embedding_ids, positions)
            self._changed()
            if self._needs_restructure():
                self._restructure()

    def set_policy(self, policy: IndexPolicy) -> bool:
        """Follow ``policy`` from now on: rebuilt at once when it wants another structure or storage for this size,
        else only its nprobe changes. Returns whether the FAISS structure was rebuilt."""
        with self._lock:
            if policy == self.policy:
                return False
            self.policy = policy
            if self.structure == "ivf":
                self.cpu.nprobe = self._nprobe()
                self._gpu.stale = True  # the GPU copy carries the old nprobe
            if policy.structure(self.size) != self.structure or storage_of(self.cpu) != policy.storage:
                self._restructure()
                return True
            return False

    def embedding_ids_of(self, record_ids: np.ndarray) -> np.ndarray:
        """The embedding id this index holds for each record id, -1 where it holds none."""
        ids = np.asarray(record_ids, dtype=np.int64)
        with self._lock:
            if self._record_ids.size == 0:
                return np.full(ids.shape, -1, dtype=np.int64)
            positions = self._positions(ids)
            return np.where(positions >= 0, self._embedding_ids[np.maximum(positions, 0)], -1)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, record ids) per query row; missing slots have id -1."""
        with self._lock, single_threaded():
            queries = np.ascontiguousarray(vectors, dtype=np.float32)
            k = min(k, max(self.size, 1))
            gpu = self._search_index(k)
            if gpu is self.cpu:
                return self.cpu.search(queries, k)
            return self._gpu.search(queries, k)

    def fingerprint(self) -> str:
        with self._lock:
            return fingerprint(self._record_ids, self._embedding_ids)

    def record_ids(self) -> np.ndarray:
        """The record ids this index holds, sorted (a copy)."""
        with self._lock:
            return self._record_ids.copy()

    def _positions(self, record_ids: np.ndarray) -> np.ndarray:
        """Each record id's position in the sorted id arrays, -1 where absent."""
        if self._record_ids.size == 0:
            return np.full(len(record_ids), -1, dtype=np.int64)
        at = np.searchsorted(self._record_ids, record_ids)
        clipped = np.minimum(at, self._record_ids.size - 1)
        return np.where(self._record_ids[clipped] == record_ids, clipped, -1)

    def _changed(self) -> None:
        self.version += 1

    def _fill(
        self,
        record_ids: np.ndarray,
        embedding_ids: np.ndarray,
        vectors: np.ndarray,
        timings: dict[str, float] | None = None,
    ) -> None:
        """Replace the whole content: a new FAISS structure chosen by size, trained on a sample when approximate."""
        if record_ids.size > 1 and not bool(np.all(record_ids[1:] > record_ids[:-1])):
            order = np.argsort(record_ids, kind="stable")
            record_ids, embedding_ids, vectors = record_ids[order], embedding_ids[order], vectors[order]
        structure = self.policy.structure(len(record_ids))
        started = time.perf_counter()
        train = training_sample(vectors, self.policy) if structure == "ivf" else None
        index = new_faiss_index(self.dim, structure, self.policy, train, len(record_ids))
        trained = time.perf_counter()
        add_in_bulk(index, record_ids, vectors)
        added = time.perf_counter()
        tuned = self._tune(index, record_ids, vectors) if structure == "ivf" else 0
        if timings is not None:
            timings.update(train_s=trained - started, add_s=added - trained, tune_s=time.perf_counter() - added)
        with self._lock:
            self.cpu, self.structure = index, structure
            self.trained_size = len(record_ids) if structure == "ivf" else 0
            self.tuned_nprobe = tuned
            self._record_ids, self._embedding_ids = record_ids, embedding_ids
            self._gpu.stale = True  # a new structure: copied anew
            self._changed()

    def _tune(self, index: faiss.IndexIVF, record_ids: np.ndarray, vectors: np.ndarray) -> int:
        """Set ``index.nprobe`` for the policy's target recall (``tune_nprobe``), logged; returns it."""
        nprobe, recall = tune_nprobe(index, record_ids, vectors, self.policy)
        if self.policy.target_recall > 0:
            reached = recall >= self.policy.target_recall
            (log.info if reached else log.warning)(
                "index of %d vectors in %d lists: nprobe %d finds %.3f of the exact 10 nearest neighbours of sampled "
                "vectors (target %.3f%s)",
                len(record_ids),
                index.nlist,
                nprobe,
                recall,
                self.policy.target_recall,
                "" if reached else "; not reached within half of the lists: an exact index may serve better",
            )
        return nprobe

    def _nprobe(self) -> int:
        """The lists a search visits: the policy's, or more where the build's tuning found more were needed."""
        tuned = self.tuned_nprobe if self.policy.target_recall > 0 else 0
        return max(self.policy.nprobe, tuned)

    def _needs_restructure(self) -> bool:
        wanted = self.policy.structure(self.size)
        if self.structure == "flat":
            return wanted == "ivf"
        if wanted == "flat":  # hysteresis: back to exact only well below the threshold
            floor = max(self.policy.approximate_above // 2, MIN_APPROXIMATE_SIZE)
            return self.policy.kind != "auto" or self.size < floor
        return self.size > RETRAIN_GROWTH * self.trained_size

    def _restructure(self) -> None:
        """Rebuild the FAISS structure from the vectors this index holds (no database, no encoder)."""
        started = time.perf_counter()
        before = self.structure
        self._fill(self._record_ids, self._embedding_ids, self._vectors())
        log.info(
            "index of %d vectors rebuilt as %s (was %s) in %.2fs",
            self.size,
            self.structure,
            before,
            time.perf_counter() - started,
        )

    def _vectors(self) -> np.ndarray:
        """The stored vectors in record id order."""
        if self.structure == "flat":
            labels = faiss.vector_to_array(self.cpu.id_map)
            vectors = self.cpu.index.reconstruct_n(0, self.size)
            return vectors[np.argsort(labels, kind="stable")]
        self.cpu.set_direct_map_type(faiss.DirectMap.Hashtable)
        try:
            return self.cpu.reconstruct_batch(self._record_ids)
        finally:
            self.cpu.set_direct_map_type(faiss.DirectMap.NoMap)

    def _search_index(self, k: int) -> faiss.Index:
        """The index to search: the CPU one, or the GPU copy (remade first when stale or due)."""
        if not self._use_gpu:
            return self.cpu
        try:
            return self._gpu.current(self.cpu, k)
        except RuntimeError as error:  # a structure this FAISS build cannot move to the GPU
            log.warning("searching a %s index on the CPU: %s", self.structure, error)
            self._use_gpu = False
            return self.cpu

    def save(self, path: Path, meta: dict) -> None:
        """Write the index files under names private to this process, fsynced, then commit them by renaming the
        manifest (``path`` with suffix .json) over the old one; the files it replaced are deleted."""
        files = index_files.IndexFiles(path)
        with self._lock:
            files.write_index(self.cpu)
            ids = np.stack([self._record_ids, self._embedding_ids])
            manifest = {
                **meta,
                "dim": self.dim,
                "structure": self.structure,
                "trained_size": self.trained_size,
                "tuned_nprobe": self.tuned_nprobe,
                "size": self.size,
                "fingerprint": self.fingerprint(),
            }
        files.commit(ids, manifest)

    @classmethod
    def load(
        cls, path: Path, expected_fingerprint: str, use_gpu: bool = False, policy: IndexPolicy | None = None
    ) -> VectorIndex | None:
        """The saved index, or None when it is missing, damaged or not the database's content."""
        found = index_files.read(path, expected_fingerprint)
        if found is None:
            return None
        manifest, cpu, ids = found
        index = cls(int(manifest["dim"]), use_gpu, policy)
        index.cpu, index.structure = cpu, manifest["structure"]
        index.trained_size = int(manifest["trained_size"])
        index.tuned_nprobe = int(manifest.get("tuned_nprobe", 0))  # files written before tuning: none
        index._record_ids, index._embedding_ids = ids[0].astype(np.int64), ids[1].astype(np.int64)
        if index.structure == "ivf":
            index.cpu.nprobe = index._nprobe()
        # Files saved under another policy (e.g. before a dataset's options changed): rebuilt to this one.
        if storage_of(index.cpu) != index.policy.storage or index._needs_restructure():
            index._restructure()
        return index


def training_sample(vectors: np.ndarray, policy: IndexPolicy) -> np.ndarray:
    """The rows an inverted file for all of ``vectors`` is trained on: 64 per list, drawn at random."""
    n = len(vectors)
    sample = min(n, nlist_for(n, policy.lists_per_sqrt) * 64)
    return vectors[np.sort(np.random.default_rng(0).choice(n, sample, replace=False))]


def add_in_bulk(index: faiss.Index, record_ids: np.ndarray, vectors: np.ndarray) -> None:
    """Add ``vectors`` labelled ``record_ids`` in chunks; FAISS spreads each chunk over its OpenMP threads."""
    for start in range(0, len(record_ids), ADD_CHUNK):
        part = slice(start, start + ADD_CHUNK)
        index.add_with_ids(np.ascontiguousarray(vectors[part], dtype=np.float32), record_ids[part])


def _last_per_record(
    record_ids: np.ndarray, embedding_ids: np.ndarray, vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batch with one row per record id: its last."""
    record_ids = np.asarray(record_ids, dtype=np.int64)
    embedding_ids = np.asarray(embedding_ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    unique, last_reversed = np.unique(record_ids[::-1], return_index=True)
    if unique.size == record_ids.size:
        return record_ids, embedding_ids, vectors
    rows = np.sort(record_ids.size - 1 - last_reversed)
    return record_ids[rows], embedding_ids[rows], vectors[rows]
