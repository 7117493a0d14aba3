"""When a VectorIndex remakes its GPU copy: not per change. The GPU is faked by a collaborator that copies to
another CPU index (the copy policy, the masking of out-of-date entries and the merge run as on a GPU)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from matching import index_gpu
from matching.index import VectorIndex
from matching.index_gpu import GpuCopies

DIM = 16


class CountingCopies(GpuCopies):
    """A 'GPU' that is a CPU clone of the index, counting the copies made."""

    def __init__(self) -> None:
        self.copies = 0

    def copy(self, cpu: faiss.Index) -> faiss.Index:
        self.copies += 1
        return faiss.clone_index(cpu)


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.standard_normal((n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def both(record_ids: np.ndarray, vectors: np.ndarray, copies: GpuCopies) -> tuple[VectorIndex, VectorIndex]:
    """The same content twice: searched through a (fake) GPU copy, and on the CPU alone."""
    embedding_ids = record_ids + 1000
    on_gpu = VectorIndex.build(record_ids, embedding_ids, vectors, use_gpu=True)
    on_gpu._gpu.copies = copies
    return on_gpu, VectorIndex.build(record_ids, embedding_ids, vectors)


def assert_same_answers(on_gpu: VectorIndex, on_cpu: VectorIndex, queries: np.ndarray, k: int = 10) -> None:
    scores, ids = on_gpu.search(queries, k)
    expected_scores, expected_ids = on_cpu.search(queries, k)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)


def test_the_gpu_copy_follows_changes_without_being_remade():
    rng = np.random.default_rng(7)
    copies = CountingCopies()
    on_gpu, on_cpu = both(np.arange(200, dtype=np.int64), unit_rows(rng, 200), copies)
    next_id = 200
    for _ in range(30):
        added = np.arange(next_id, next_id + 3, dtype=np.int64)
        next_id += 3
        replaced = rng.choice(next_id - 3, 2, replace=False).astype(np.int64)
        removed = rng.choice(next_id, 1).astype(np.int64)
        changed = np.concatenate([added, replaced])
        vectors = unit_rows(rng, len(changed))
        for index in (on_gpu, on_cpu):
            index.upsert(changed, changed + 1000, vectors)
            index.remove(removed)
        assert_same_answers(on_gpu, on_cpu, unit_rows(rng, 5))
        assert_same_answers(on_gpu, on_cpu, vectors)  # the new vectors find themselves first
    assert copies.copies == 1, "one copy, followed in place"

    on_gpu._gpu.refresh_seconds = 0.0  # due now: remade at the next search, once
    assert_same_answers(on_gpu, on_cpu, unit_rows(rng, 5))
    assert_same_answers(on_gpu, on_cpu, unit_rows(rng, 5))
    assert copies.copies == 2
    fresh = np.arange(next_id, next_id + 5, dtype=np.int64)
    for index in (on_gpu, on_cpu):
        index.upsert(fresh, fresh + 1000, unit_rows(np.random.default_rng(1), 5))
    assert_same_answers(on_gpu, on_cpu, unit_rows(rng, 5))
    assert copies.copies == 2, "added records alone never call for a copy"


def test_too_many_out_of_date_entries_remake_the_copy_before_the_refresh_interval(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(index_gpu, "GPU_MAX_MASKED", 8)
    rng = np.random.default_rng(3)
    copies = CountingCopies()
    on_gpu, on_cpu = both(np.arange(100, dtype=np.int64), unit_rows(rng, 100), copies)
    assert_same_answers(on_gpu, on_cpu, unit_rows(rng, 3))
    for index in (on_gpu, on_cpu):
        index.remove(np.arange(8))
    assert_same_answers(on_gpu, on_cpu, unit_rows(rng, 3))
    assert copies.copies == 1, "8 out-of-date entries are within the bound"
    for index in (on_gpu, on_cpu):
        index.remove(np.arange(8, 10))
    assert_same_answers(on_gpu, on_cpu, unit_rows(rng, 3))
    assert copies.copies == 2


def test_a_new_structure_is_copied_anew():
    rng = np.random.default_rng(5)
    copies = CountingCopies()
    on_gpu, on_cpu = both(np.arange(50, dtype=np.int64), unit_rows(rng, 50), copies)
    assert_same_answers(on_gpu, on_cpu, unit_rows(rng, 3))
    policy = on_gpu.policy.__class__(storage="float16")
    on_gpu.set_policy(policy)
    on_cpu.set_policy(policy)
    assert_same_answers(on_gpu, on_cpu, unit_rows(rng, 3))
    assert copies.copies == 2
