"""Match, candidates and calibration: cosine similarity over stored (or freshly encoded) vectors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import and_, or_, select, tuple_
from sqlalchemy.orm import Session

from encoding.encoder import EncoderInput
from encoding.recipe import Recipe, record_input
from encoding.registry import EncoderPool
from llmatch.models import ENCODED, Calibration, Dataset, Embedding, Record
from llmatch.vectors import from_bytes
from matching import calibration as calib
from matching.errors import UnknownSource
from matching.neighbours import neighbours
from matching.registry import IndexRegistry
from service.datasets import unknown_dataset
from service.errors import Conflict, NotFound, without_paths
from service.records import unknown_record
from service.schemas import (
    CalibrateIn,
    CalibrateOut,
    Candidate,
    InlineRecord,
    LabelledPair,
    MatchOut,
    RecordRef,
)


@dataclass(frozen=True)
class Query:
    """A vector to compare, and the stored record it came from (if any)."""

    vector: np.ndarray
    record_id: int | None = None
    source: str | None = None


def dataset_and_calibration(session: Session, name: str) -> tuple[Dataset, Calibration | None]:
    """The dataset called ``name`` (404 when there is none) and its active calibration, in one query."""
    row = session.execute(
        select(Dataset, Calibration)
        .outerjoin(Calibration, Calibration.dataset_id == Dataset.id)
        .where(Dataset.name == name)
    ).first()
    if row is None:
        raise unknown_dataset(name)
    return row[0], row[1]


def stored_query(session: Session, dataset: Dataset, source: str, record_id: str) -> Query:
    """The stored vector of a record (one query): 404 when unknown, 409 while it is not encoded."""
    return stored_queries(session, dataset, [(source, record_id)])[0]


def stored_queries(session: Session, dataset: Dataset, refs: Sequence[tuple[str, str]]) -> list[Query]:
    """The stored vectors of several records of a dataset, in one query; the first unknown (404) or not yet
    encoded (409) record, in the order given, is the error."""
    rows = session.execute(
        select(
            Record.id, Record.source, Record.external_id, Record.status, Record.error, Embedding.vector, Embedding.dim
        )
        .outerjoin(Embedding, Record.embedding_id == Embedding.id)
        .where(
            Record.dataset_id == dataset.id,
            or_(*(and_(Record.source == source, Record.external_id == rid) for source, rid in dict.fromkeys(refs))),
        )
    ).all()
    found = {(row.source, row.external_id): row for row in rows}
    queries = []
    for source, record_id in refs:
        row = found.get((source, record_id))
        if row is None:
            raise unknown_record(dataset, source, record_id)
        if row.status != ENCODED or row.vector is None:
            last_error = f" Last error: {without_paths(row.error)}" if row.error else ""
            raise Conflict(
                f"Record {record_id!r} in source {source!r} is {row.status}, not encoded yet; "
                "retry once the encoder worker has processed it." + last_error
            )
        queries.append(Query(from_bytes(row.vector, row.dim), row.id, source))
    return queries


@dataclass(frozen=True)
class ToEncode:
    """An inline record rendered for its dataset's encoder, to be encoded once no session is open."""

    encoder: str
    item: EncoderInput


def prepare_inline(session: Session, pool: EncoderPool, dataset: Dataset, record: InlineRecord) -> Query | ToEncode:
    """The vector of a record of this dataset with an identical text, or what to encode (inline records are
    never stored)."""
    made = record_input(record.attributes, Recipe.of_dataset(dataset, pool.max_text_chars))  # as the worker cuts
    key = pool.spec(dataset.encoder).key
    cached = _dataset_vector(session, dataset, key, made.input_hash)
    if cached is not None:
        return Query(cached)
    return ToEncode(dataset.encoder, made.item)


def prepare(session: Session, pool: EncoderPool, dataset: Dataset, item: RecordRef | InlineRecord) -> Query | ToEncode:
    if isinstance(item, RecordRef):
        return stored_query(session, dataset, item.source, item.id)
    return prepare_inline(session, pool, dataset, item)


def encoded(pool: EncoderPool, prepared: Query | ToEncode) -> Query:
    """Encode what ``prepare`` left to encode. Call it with no session open: the model may take seconds, and an
    open session would hold a database connection (and, on SQLite, a snapshot) all that time."""
    if isinstance(prepared, Query):
        return prepared
    return Query(pool.encode(prepared.encoder, [prepared.item])[0])


def _dataset_vector(session: Session, dataset: Dataset, encoder_key: str, digest: str) -> np.ndarray | None:
    """The cached vector of this text only if a record of ``dataset`` holds it: the content cache is shared
    across datasets, and reusing another dataset's vector would reveal (by its speed) that the text is there."""
    held = select(Record.id).where(Record.dataset_id == dataset.id, Record.embedding_id == Embedding.id).exists()
    row = session.execute(
        select(Embedding.vector, Embedding.dim).where(
            Embedding.encoder_key == encoder_key, Embedding.input_hash == digest, held
        )
    ).first()
    return None if row is None else from_bytes(row.vector, row.dim)


def cosine(left: np.ndarray, right: np.ndarray) -> float:
    return float(np.clip(np.dot(left, right), -1.0, 1.0))


def decide(session: Session, dataset: Dataset, score: float) -> MatchOut:
    """Score plus the dataset's calibrated threshold, decision and probability (null while uncalibrated)."""
    return decision(active_calibration(session, dataset), score)


def decision(calibration: Calibration | None, score: float) -> MatchOut:
    """Score plus ``calibration``'s threshold, decision and probability (null without one)."""
    if calibration is None:
        return MatchOut(score=score, threshold=None, match=None, probability=None)
    return MatchOut(
        score=score,
        threshold=calibration.threshold,
        match=score >= calibration.threshold,
        probability=calib.probability(calibration.probability_model, score),
    )


def active_calibration(session: Session, dataset: Dataset) -> Calibration | None:
    return session.scalar(select(Calibration).where(Calibration.dataset_id == dataset.id))


def candidates(
    session: Session,
    registry: IndexRegistry,
    dataset: Dataset,
    calibration: Calibration | None,
    query: Query,
    k: int,
    target_source: str | None,
) -> list[Candidate]:
    """The ``k`` nearest records of the target sources, best first, never the query record itself; ``match``
    by the dataset's active ``calibration``."""
    try:
        [found] = neighbours(
            session,
            registry,
            dataset.id,
            query.vector,
            k,
            record_ids=[query.record_id],
            sources=[query.source],
            target=target_source,
        )
    except UnknownSource as error:
        raise NotFound(
            f"Dataset {dataset.name!r} has no source {error.source!r}; "
            f"its sources: {', '.join(error.known) or 'none yet'}."
        ) from error
    return [
        Candidate(
            source=hit.source,
            id=hit.external_id,
            score=hit.score,
            match=None if calibration is None else hit.score >= calibration.threshold,
        )
        for hit in found[:k]
    ]


def calibrate(session: Session, dataset: Dataset, encoder_key: str, body: CalibrateIn) -> CalibrateOut:
    """Score labelled pairs, choose the F1-maximising threshold, fit probabilities, store as active."""
    refs = {(p.left_source, p.left_id) for p in body.pairs} | {(p.right_source, p.right_id) for p in body.pairs}
    vectors = _encoded_vectors(session, dataset, refs)
    scores = np.array([_pair_score(vectors, pair) for pair in body.pairs], dtype=np.float64)
    labels = np.array([pair.label for pair in body.pairs], dtype=np.int64)
    choice = calib.best_f1_threshold(scores, labels)
    mapping = calib.fit_probability(scores, labels)
    session.execute(Calibration.__table__.delete().where(Calibration.dataset_id == dataset.id))
    calibration = Calibration(
        dataset_id=dataset.id,
        encoder_key=encoder_key,
        objective=body.objective,
        threshold=choice.threshold,
        precision=choice.precision,
        recall=choice.recall,
        f1=choice.f1,
        pairs=len(body.pairs),
        positives=int(labels.sum()),
        probability_model=mapping,
    )
    session.add(calibration)
    session.flush()
    return CalibrateOut.model_validate(calibration)


def _pair_score(vectors: dict[tuple[str, str], np.ndarray], pair: LabelledPair) -> float:
    return cosine(vectors[(pair.left_source, pair.left_id)], vectors[(pair.right_source, pair.right_id)])


def _encoded_vectors(
    session: Session, dataset: Dataset, refs: set[tuple[str, str]]
) -> dict[tuple[str, str], np.ndarray]:
    """Vectors of the referenced records; 404 naming unknown ones, 409 naming those not encoded."""
    found: dict[tuple[str, str], Any] = {}
    ordered = sorted(refs)
    for start in range(0, len(ordered), 500):
        chunk = ordered[start : start + 500]
        rows = session.execute(
            select(Record.source, Record.external_id, Record.status, Embedding.vector, Embedding.dim)
            .outerjoin(Embedding, Record.embedding_id == Embedding.id)
            .where(Record.dataset_id == dataset.id, tuple_(Record.source, Record.external_id).in_(chunk))
        )
        found.update({(source, rid): (status, blob, dim) for source, rid, status, blob, dim in rows})
    unknown = [ref for ref in ordered if ref not in found]
    if unknown:
        raise NotFound(
            f"{len(unknown)} pair record(s) are unknown in dataset {dataset.name!r}, e.g. "
            f"{_names(unknown)}; ingest them first.",
            unknown=[list(r) for r in unknown[:100]],
        )
    waiting = [ref for ref, (status, blob, _) in found.items() if status != ENCODED or blob is None]
    if waiting:
        raise Conflict(
            f"{len(waiting)} pair record(s) are not encoded yet, e.g. {_names(sorted(waiting))}; "
            "retry once the encoder worker has processed them.",
            not_encoded=[list(r) for r in sorted(waiting)[:100]],
        )
    return {ref: from_bytes(blob, dim) for ref, (_, blob, dim) in found.items()}


def _names(refs: list[tuple[str, str]]) -> str:
    return ", ".join(f"{source}/{rid}" for source, rid in refs[:5])
