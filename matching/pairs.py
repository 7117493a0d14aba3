"""Candidate pairs of a dataset's stored records: each encoded record with its ``k`` nearest records of its
default target sources (every other source; its own in a single-source dataset), scored by cosine.

``indexed_candidate_pairs`` (review) searches through ``matching.neighbours``; ``candidate_pairs`` is for vectors
held by no index or database (offline benchmarks), with the same target-source rule."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import faiss
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from llmatch.models import ENCODED, Embedding, Record
from llmatch.vectors import stack
from matching.neighbours import neighbours, target_sources
from matching.registry import IndexRegistry


@dataclass(frozen=True)
class EncodedRecords:
    """Encoded records of one dataset, row i of each field describing the same record."""

    ids: np.ndarray  # record ids (int64)
    sources: list[str]
    external_ids: list[str]
    embedding_ids: np.ndarray
    vectors: np.ndarray  # (n, dim) float32, unit rows

    def __len__(self) -> int:
        return len(self.sources)

    def row_of(self) -> dict[int, int]:
        return {int(record_id): row for row, record_id in enumerate(self.ids)}


def load_encoded(session: Session, dataset_id: int, record_ids: Iterable[int] | None = None) -> EncodedRecords:
    """Every encoded record of a dataset (or those of ``record_ids`` that are encoded), ordered by id."""
    query = (
        select(Record.id, Record.source, Record.external_id, Embedding.id, Embedding.vector, Embedding.dim)
        .join(Embedding, Record.embedding_id == Embedding.id)
        .where(Record.dataset_id == dataset_id, Record.status == ENCODED)
        .order_by(Record.id)
    )
    if record_ids is None:
        rows = list(session.execute(query.execution_options(yield_per=10_000)))
    else:
        wanted = sorted({int(record_id) for record_id in record_ids})
        rows = []
        for start in range(0, len(wanted), 500):
            rows += session.execute(query.where(Record.id.in_(wanted[start : start + 500]))).all()
        rows.sort(key=lambda row: row[0])
    dim = rows[0][5] if rows else 0
    return EncodedRecords(
        ids=np.array([r[0] for r in rows], dtype=np.int64),
        sources=[r[1] for r in rows],
        external_ids=[r[2] for r in rows],
        embedding_ids=np.array([r[3] for r in rows], dtype=np.int64),
        vectors=stack([r[4] for r in rows], dim),
    )


def encoded_ids(session: Session, dataset_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(record ids, embedding ids) of every encoded record of a dataset, by record id; no vectors read."""
    rows = session.execute(
        select(Record.id, Record.embedding_id)
        .where(Record.dataset_id == dataset_id, Record.status == ENCODED, Record.embedding_id.is_not(None))
        .order_by(Record.id)
        .execution_options(yield_per=50_000)
    ).all()
    array = np.array(rows, dtype=np.int64).reshape(-1, 2)
    return array[:, 0].copy(), array[:, 1].copy()


def candidate_pairs(
    records: EncodedRecords, k: int, queries: Iterable[int] | None = None
) -> dict[tuple[int, int], float]:
    """Scores of the pairs (row i, row j), i < j, where one record is among the other's ``k`` nearest in its targets,
    searched exactly in memory (for vectors no index holds: offline benchmarks; the service searches through
    ``matching.neighbours``).

    ``queries`` (rows) limits which records look for neighbours; by default all do.
    """
    by_source: dict[str, np.ndarray] = {}
    for source in sorted(set(records.sources)):
        by_source[source] = np.array([i for i, s in enumerate(records.sources) if s == source], dtype=np.int64)
    asking = set(range(len(records))) if queries is None else set(queries)
    pairs: dict[tuple[int, int], float] = {}
    for source, rows in by_source.items():
        query_rows = np.array([i for i in rows if i in asking], dtype=np.int64)
        if query_rows.size == 0:
            continue
        for target in target_sources(by_source, source):
            target_rows = by_source[target]
            index = faiss.IndexFlatIP(records.vectors.shape[1])
            index.add(np.ascontiguousarray(records.vectors[target_rows]))
            extra = 1 if target == source else 0
            scores, found = index.search(
                np.ascontiguousarray(records.vectors[query_rows]), min(k + extra, len(target_rows))
            )
            for q, row in enumerate(query_rows):
                for score, hit in zip(scores[q], found[q], strict=True):
                    if hit < 0:
                        continue
                    other = int(target_rows[hit])
                    if other == row:
                        continue
                    key = (int(row), other) if row < other else (other, int(row))
                    pairs[key] = min(float(score), 1.0)
    return pairs


@dataclass(frozen=True)
class IndexedPairs:
    """Candidate pairs found through a process's loaded indexes, keyed by record ids (smaller first), with the
    (source, external id) of every record they name."""

    scores: dict[tuple[int, int], float]
    names: dict[int, tuple[str, str]]


def query_sample(registry: IndexRegistry, dataset_id: int, limit: int, avoid: Iterable[int], seed: int) -> np.ndarray:
    """Up to ``limit`` record ids held by the dataset's indexes, sorted: all of them when they are no more, else
    a deterministic shuffle by ``seed`` that takes records outside ``avoid`` first."""
    held = [registry.record_ids(key) for key in registry.keys() if key[0] == dataset_id]
    ids = np.unique(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    if ids.size <= limit:
        return ids
    avoided = np.isin(ids, np.fromiter(avoid, dtype=np.int64))
    order = np.lexsort((_shuffled_rank(ids, seed), avoided))
    return np.sort(ids[order[:limit]])


def _shuffled_rank(ids: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random but repeatable rank per id (splitmix64 of the id and the seed)."""
    with np.errstate(over="ignore"):
        x = ids.astype(np.uint64) + np.uint64(seed % (1 << 63)) * np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def indexed_candidate_pairs(
    session: Session, registry: IndexRegistry, dataset_id: int, queries: EncodedRecords, k: int
) -> IndexedPairs:
    """The pairs of each query record with its ``k`` nearest records in its target sources (``neighbours``: this
    process's loaded indexes, hits the database no longer holds encoded with that vector dropped)."""
    found = neighbours(
        session, registry, dataset_id, queries.vectors, k, record_ids=queries.ids.tolist(), sources=queries.sources
    )
    names = {int(i): (s, e) for i, s, e in zip(queries.ids, queries.sources, queries.external_ids, strict=True)}
    scores: dict[tuple[int, int], float] = {}
    for query_id, hits in zip(queries.ids.tolist(), found, strict=True):
        for hit in hits:
            names[hit.record_id] = (hit.source, hit.external_id)
            scores[(min(query_id, hit.record_id), max(query_id, hit.record_id))] = hit.score
    return IndexedPairs(scores, names)
