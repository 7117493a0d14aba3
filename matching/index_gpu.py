"""GPU copies of CPU indexes (FAISS, GPU 0), followed in place between copies.

A GPU copy follows added records in place; entries made out of date (records replaced or removed) are left out
of its answers and the records' current vectors searched beside it, until the copy is remade: at most once per
GPU_REFRESH_SECONDS, or sooner once GPU_MAX_MASKED entries are out of date (each costs an extra result per search).
"""

from __future__ import annotations

import time

import faiss
import numpy as np

from matching.index_policy import IndexPolicy, new_faiss_index

GPU_REFRESH_SECONDS = 30.0
GPU_MAX_MASKED = 1024
GPU_MAX_K = 2048  # the most results a FAISS GPU search returns per query


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class GpuCopies:
    """Makes the GPU copy of a CPU index (FAISS, GPU 0); a collaborator, so that when copies are made can be tested
    on machines without a GPU."""

    def copy(self, cpu: faiss.Index) -> faiss.Index:
        return faiss.index_cpu_to_gpu(_gpu_resources(), 0, cpu)


class GpuCopy:
    """The GPU copy of one CPU index: made by ``copies``, remade when ``stale`` or due, followed in place between."""

    def __init__(self, dim: int, copies: GpuCopies | None = None):
        self.copies = copies or GpuCopies()
        self.index: faiss.Index | None = None
        self.stale = True  # the copy must be remade before the next search
        self.masked: set[int] = set()  # record ids whose entries in the copy are out of date
        self.masked_since = 0.0  # time.monotonic() when the first of them went out of date
        self.delta = new_faiss_index(dim, "flat", IndexPolicy())  # current vectors of masked records
        self.refresh_seconds = GPU_REFRESH_SECONDS

    def current(self, cpu: faiss.Index, k: int) -> faiss.Index:
        """The copy to search, remade from ``cpu`` first when stale or due (``due``). Raises RuntimeError for a
        structure this FAISS build cannot move to the GPU."""
        if self.stale or self.due(k):
            self.index = self.copies.copy(cpu)
            self.stale = False
            self.masked.clear()
            self.delta.reset()
        return self.index

    def due(self, k: int) -> bool:
        """Whether the copy's out-of-date entries call for a new copy now."""
        masked = len(self.masked)
        if not masked:
            return False
        too_many = masked > GPU_MAX_MASKED or k + masked > GPU_MAX_K
        return too_many or time.monotonic() - self.masked_since >= self.refresh_seconds

    def upsert(self, record_ids: np.ndarray, vectors: np.ndarray, present: np.ndarray) -> None:
        """Follow an upsert: records the copy never held are added to it; the others' entries are out of date,
        and their new vectors are searched beside it."""
        if self.index is None or self.stale:
            return
        masked = np.fromiter(self.masked, dtype=np.int64, count=len(self.masked))
        fresh = ~present & ~np.isin(record_ids, masked)
        if fresh.any():
            self.index.add_with_ids(vectors[fresh], record_ids[fresh])
        if (~fresh).any():
            self.out_of_date(record_ids[~fresh])
            self.delta.add_with_ids(vectors[~fresh], record_ids[~fresh])

    def out_of_date(self, record_ids: np.ndarray) -> None:
        """The copy's entries of these records no longer count (nor their vectors searched beside it)."""
        if self.index is None or self.stale or record_ids.size == 0:
            return
        if not self.masked:
            self.masked_since = time.monotonic()
        self.masked.update(int(i) for i in record_ids)
        self.delta.remove_ids(faiss.IDSelectorBatch(np.asarray(record_ids, dtype=np.int64)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search the copy for ``k`` more results than it has out-of-date entries, leave those out, and merge
        in the current vectors of the records they belonged to."""
        assert self.index is not None, "search after current()"
        if not self.masked:
            return self.index.search(queries, k)
        masked = np.fromiter(self.masked, dtype=np.int64, count=len(self.masked))
        scores, ids = self.index.search(queries, k + masked.size)
        ids = np.where(np.isin(ids, masked), -1, ids)
        if self.delta.ntotal:
            more_scores, more_ids = self.delta.search(queries, min(k, self.delta.ntotal))
            scores, ids = np.hstack([scores, more_scores]), np.hstack([ids, more_ids])
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, best, axis=1), np.take_along_axis(ids, best, axis=1)


_GPU_RESOURCES = None


def _gpu_resources():
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES
