"""An index rebuilt from the stored vectors (start-up without index files): the read returns exactly what is
stored, in record id order, and an inverted file built from it holds those vectors and still updates and
removes records."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session

from bench.vectors import Space, store_vectors
from llmatch.db import make_engine
from llmatch.models import Embedding, Record
from matching import index_sync
from matching.index import VectorIndex
from matching.index_policy import MIN_APPROXIMATE_SIZE, IndexPolicy

SPACE = Space(dim=32, latent=8, clusters=200, spread=0.3, noise=0.05)


def _stored(database_url: str, n: int) -> tuple[np.ndarray, tuple[int, str]]:
    """``n`` vectors stored as encoded records of source a; (the vectors in storage order, the index key)."""
    vectors = SPACE.array(n, seed=1)
    engine = make_engine(database_url)
    store_vectors(engine, "rebuild", "a", iter([vectors]))
    with Session(engine) as session:
        dataset_id = session.scalar(select(Record.dataset_id).limit(1))
    engine.dispose()
    return vectors, (dataset_id, "a")


@pytest.mark.parametrize("expected", [0, 100, 5000])  # too few rows foreseen (the arrays grow), or too many
def test_the_read_returns_exactly_the_stored_vectors_in_record_order(database_url, monkeypatch, expected):
    monkeypatch.setattr(index_sync, "PAGE", 97)  # many pages, the last one short
    vectors, key = _stored(database_url, 1000)
    engine = make_engine(database_url)
    with Session(engine) as session, session.begin():
        records = session.execute(select_pairs(key)).all()
        record_ids, embedding_ids, read = index_sync.stored_vectors(session, key, expected)
    engine.dispose()
    assert record_ids.tolist() == [r for r, _ in records]
    assert embedding_ids.tolist() == [e for _, e in records]
    assert read.dtype == np.float32 and read.flags.c_contiguous
    np.testing.assert_array_equal(read, vectors)


def test_vectors_of_another_dimension_are_left_out_of_the_read(database_url, monkeypatch):
    monkeypatch.setattr(index_sync, "PAGE", 50)
    vectors, key = _stored(database_url, 300)
    engine = make_engine(database_url)
    with Session(engine) as session, session.begin():
        records = session.execute(select_pairs(key)).all()
        foreign = [e for _, e in records[90:160]]  # one whole page and parts of its neighbours
        session.execute(
            update(Embedding).where(Embedding.id.in_(foreign)).values(dim=16, vector=np.zeros(16, "<f4").tobytes())
        )
        session.flush()
        record_ids, _, read = index_sync.stored_vectors(session, key, 300)
    engine.dispose()
    kept = np.r_[0:90, 160:300]
    assert record_ids.tolist() == [records[i][0] for i in kept]
    np.testing.assert_array_equal(read, vectors[kept])


def select_pairs(key: tuple[int, str]) -> Select:
    """(record id, embedding id) of the key's encoded records, by record id."""
    return (
        select(Record.id, Record.embedding_id)
        .where(Record.dataset_id == key[0], Record.source == key[1], Record.status == "encoded")
        .order_by(Record.id)
    )


def test_a_rebuilt_inverted_file_holds_the_vectors_and_still_updates_and_removes():
    n = MIN_APPROXIMATE_SIZE + 1000
    vectors = SPACE.array(n, seed=2)
    ids = np.arange(n, dtype=np.int64) * 5 + 3
    timings: dict[str, float] = {}
    index = VectorIndex.build(ids, ids + 1, vectors, policy=IndexPolicy(kind="ivf", nprobe=64), timings=timings)
    assert index.structure == "ivf" and isinstance(index.cpu, faiss.IndexIVFFlat)
    assert set(timings) == {"train_s", "add_s", "tune_s"} and min(timings.values()) >= 0
    assert index.size == n and index.record_ids().tolist() == ids.tolist()
    np.testing.assert_array_equal(index._vectors(), vectors)

    index.remove(ids[:10].tolist())
    replacement = SPACE.array(5, seed=3)
    index.upsert(ids[10:15], ids[10:15] + 100, replacement)
    assert index.size == n - 10
    assert index.embedding_ids_of(ids[8:16]).tolist() == [-1, -1, *(ids[10:15] + 100), ids[15] + 1]
    held = index._vectors()
    np.testing.assert_array_equal(held[:5], replacement)
    np.testing.assert_array_equal(held[5:], vectors[15:])
    _, found = index.search(replacement, 1)
    assert found[:, 0].tolist() == ids[10:15].tolist()
    _, found = index.search(vectors[:10], 10)
    assert not set(found.ravel().tolist()) & set(ids[:10].tolist())


def test_a_search_leaves_the_thread_on_all_openmp_threads_for_the_next_rebuild():
    vectors = SPACE.array(MIN_APPROXIMATE_SIZE + 100, seed=4)
    ids = np.arange(len(vectors), dtype=np.int64)
    threads = faiss.omp_get_max_threads()
    index = VectorIndex.build(ids, ids, vectors, policy=IndexPolicy(kind="ivf"))
    index.search(vectors[:3], 5)  # on one thread, for the search only
    assert faiss.omp_get_max_threads() == threads
