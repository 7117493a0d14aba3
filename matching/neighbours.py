"""Neighbour search, the one path every caller takes (/candidates, entities, review, regrouping).

A query searches its target sources (``target_sources``: every other source, its own in a single-source
dataset, or the one named) in this process's loaded indexes, never finds itself, and keeps only the hits the
database still holds encoded in the dataset with the vector the index holds (an index may lag behind a
deletion, a re-queue or a re-encode: only what the database says is encoded, with this vector, is served).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from llmatch.models import ENCODED, Record
from matching.errors import IndexBehind, UnknownSource
from matching.registry import IndexRegistry


@dataclass(frozen=True)
class Neighbour:
    record_id: int
    source: str
    external_id: str
    score: float  # cosine, at most 1.0


def dataset_sources(session: Session, dataset_id: int) -> list[str]:
    """The sources that hold at least one record of the dataset, sorted: one index seek per source on the
    (dataset, source, status) index, where DISTINCT would read every record of the dataset."""
    found: list[str] = []
    while True:
        query = select(func.min(Record.source)).where(Record.dataset_id == dataset_id)
        if found:
            query = query.where(Record.source > found[-1])
        source = session.scalar(query)
        if source is None:
            return found
        found.append(source)


def target_sources(known: Sequence[str], source: str | None, target: str | None = None) -> list[str]:
    """The sources a query of ``source`` searches: ``target`` when given (``UnknownSource`` when it is not among
    ``known``); else every other source; a single-source dataset (deduplication) searches its own source, and a
    query of no source (an inline record) every source."""
    if target is not None:
        if target not in known:
            raise UnknownSource(target, sorted(set(known)))
        return [target]
    others = sorted({s for s in known if s != source})
    return others or ([source] if source is not None else sorted(set(known)))


def neighbours(
    session: Session,
    registry: IndexRegistry,
    dataset_id: int,
    vectors: np.ndarray,
    k: int,
    *,
    record_ids: Sequence[int | None] | None = None,
    sources: Sequence[str | None] | None = None,
    target: str | None = None,
    known: Sequence[str] | None = None,
) -> list[list[Neighbour]]:
    """For each query row of ``vectors``: its ``k`` nearest records in each of its target sources, best first.

    ``record_ids`` and ``sources`` (per row, None for an inline query) say which stored record a query is, so that
    it is not its own neighbour, and which sources it searches; ``known`` is the dataset's sources (read from the
    database when not given). Hits the database no longer holds encoded with the indexed vector are dropped.
    """
    queries = np.asarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries.reshape(1, -1) if queries.ndim == 1 else queries)
    count = len(queries)
    if count == 0:
        return []
    record_ids = list(record_ids) if record_ids is not None else [None] * count
    sources = list(sources) if sources is not None else [None] * count
    known = list(known) if known is not None else dataset_sources(session, dataset_id)
    found: list[list[tuple[float, int]]] = [[] for _ in range(count)]
    held: dict[int, int] = {}  # record id -> the embedding id the index holds for it
    for searched, rows in _rows_by_target(known, sources, target).items():
        index = registry.get((dataset_id, searched))
        if index is None or index.size == 0:
            continue
        # One search per target source for every query row that searches it; one more hit where a row may find
        # itself (a stored record of that source), dropped below.
        itself = any(record_ids[row] is not None and sources[row] == searched for row in rows)
        if queries.shape[1] != index.dim:
            raise IndexBehind(
                f"the index of dataset {dataset_id}, source {searched!r} holds {index.dim}-dimensional "
                f"vectors, the queries are {queries.shape[1]}-dimensional"
            )
        scores, ids = index.search(queries[rows], k + (1 if itself else 0))
        embedding_ids = index.embedding_ids_of(ids.ravel()).reshape(ids.shape)
        for at, row in enumerate(rows):
            kept = 0
            for score, other, embedding_id in zip(scores[at], ids[at], embedding_ids[at], strict=True):
                if other < 0 or other == record_ids[row] or kept == k:
                    continue
                kept += 1
                held[int(other)] = int(embedding_id)
                found[row].append((min(float(score), 1.0), int(other)))
    names = current_names(session, dataset_id, held)
    answers = []
    for hits in found:
        hits.sort(key=lambda hit: -hit[0])  # stable: ties keep the target sources' order
        answers.append([Neighbour(rid, *names[rid], score) for score, rid in hits if rid in names])
    return answers


def _rows_by_target(known: Sequence[str], sources: Sequence[str | None], target: str | None) -> dict[str, list[int]]:
    """Target source -> the query rows that search it (in row order), so that a batch of queries of mixed sources
    (stored records of several sources, inline records) costs one index search per target source."""
    by_source: dict[str | None, list[int]] = defaultdict(list)
    for row, source in enumerate(sources):
        by_source[source].append(row)
    by_target: dict[str, list[int]] = defaultdict(list)
    for source, rows in by_source.items():
        for searched in target_sources(known, source, target):
            by_target[searched].extend(rows)
    return {searched: sorted(by_target[searched]) for searched in sorted(by_target)}  # each row's targets in order


def current_names(session: Session, dataset_id: int, held: dict[int, int]) -> dict[int, tuple[str, str]]:
    """(source, external id) of those records still encoded in the dataset with the vector the index holds."""
    wanted = sorted(held)
    names: dict[int, tuple[str, str]] = {}
    for start in range(0, len(wanted), 500):
        # By primary key, checked here: a condition on status would let the planner scan the status index instead.
        rows = session.execute(
            select(
                Record.id, Record.source, Record.external_id, Record.dataset_id, Record.status, Record.embedding_id
            ).where(Record.id.in_(wanted[start : start + 500]))
        )
        names.update(
            {
                row.id: (row.source, row.external_id)
                for row in rows
                if row.dataset_id == dataset_id and row.status == ENCODED and row.embedding_id == held[row.id]
            }
        )
    return names
