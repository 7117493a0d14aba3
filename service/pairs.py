"""Candidate pairs of a dataset's stored records: each encoded record with its ``k`` nearest records of its
default target sources (every other source; its own in a single-source dataset), scored by cosine."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import faiss
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from llmatch.models import ENCODED, Embedding, Record
from llmatch.vectors import stack


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
        wanted = sorted(set(record_ids))
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


def target_sources(known: Iterable[str], source: str) -> list[str]:
    """Every other source; a single-source dataset (deduplication) searches its own source."""
    others = sorted({s for s in known if s != source})
    return others or [source]


def candidate_pairs(
    records: EncodedRecords, k: int, queries: Iterable[int] | None = None
) -> dict[tuple[int, int], float]:
    """Scores of the pairs (row i, row j), i < j, where one record is among the other's ``k`` nearest in its targets.

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
