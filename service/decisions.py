"""Match, candidates and calibration: cosine similarity over stored (or freshly encoded) vectors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from encoder_worker.encoders.base import EncoderInput
from encoder_worker.encoders.registry import EncoderPool
from encoder_worker.queue import render_config
from encoder_worker.render import input_hash, render
from llmatch.models import ENCODED, Calibration, Dataset, Embedding, Record
from llmatch.vectors import from_bytes, load_vectors
from service import calibration as calib
from service.datasets import sources
from service.errors import Conflict, NotFound
from service.index import IndexRegistry
from service.records import get_record
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


def stored_query(session: Session, dataset: Dataset, source: str, record_id: str) -> Query:
    """The stored vector of a record: 404 when unknown, 409 while it is not encoded."""
    record = get_record(session, dataset, source, record_id)
    if record.status != ENCODED or record.embedding is None:
        raise Conflict(
            f"Record {record_id!r} in source {source!r} is {record.status}, not encoded yet; "
            "retry once the encoder worker has processed it." + (f" Last error: {record.error}" if record.error else "")
        )
    return Query(from_bytes(record.embedding.vector, record.embedding.dim), record.id, source)


def inline_query(session: Session, pool: EncoderPool, dataset: Dataset, record: InlineRecord) -> Query:
    """Encode an inline record on the spot (or reuse the stored vector of an identical text); not stored."""
    config = render_config(dataset)
    text = render(record.attributes, config, dataset.seen_attributes)
    key = pool.spec(dataset.encoder).key
    digest = input_hash(config.instruction, text)
    cached = load_vectors(session, key, [digest]).get(digest)
    if cached is not None:
        return Query(cached)
    return Query(pool.encode(dataset.encoder, [EncoderInput(config.instruction, text)])[0])


def resolve(session: Session, pool: EncoderPool, dataset: Dataset, item: RecordRef | InlineRecord) -> Query:
    if isinstance(item, RecordRef):
        return stored_query(session, dataset, item.source, item.id)
    return inline_query(session, pool, dataset, item)


def cosine(left: np.ndarray, right: np.ndarray) -> float:
    return float(np.clip(np.dot(left, right), -1.0, 1.0))


def decide(session: Session, dataset: Dataset, score: float) -> MatchOut:
    """Score plus the dataset's calibrated threshold, decision and probability (null while uncalibrated)."""
    calibration = active_calibration(session, dataset)
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
    session: Session, registry: IndexRegistry, dataset: Dataset, query: Query, k: int, target_source: str | None
) -> list[Candidate]:
    """The ``k`` nearest records of the target sources, best first, never the query record itself."""
    known = sources(session, dataset.id)
    if target_source is not None and target_source not in known:
        raise NotFound(
            f"Dataset {dataset.name!r} has no source {target_source!r}; its sources: {', '.join(known) or 'none yet'}."
        )
    targets = [target_source] if target_source else _default_targets(known, query.source)
    hits: list[tuple[float, int]] = []
    for source in targets:
        extra = 1 if query.record_id is not None and source == query.source else 0
        for hit in registry.search((dataset.id, source), query.vector, k + extra):
            if hit.record_id != query.record_id:
                hits.append((hit.score, hit.record_id))
    hits.sort(key=lambda item: -item[0])
    return _as_candidates(session, dataset, hits[:k])


def _default_targets(known: Sequence[str], query_source: str | None) -> list[str]:
    """Every other source; a single-source dataset (deduplication) searches its own source."""
    others = [source for source in known if source != query_source]
    return others or ([query_source] if query_source else list(known))


def _as_candidates(session: Session, dataset: Dataset, hits: list[tuple[float, int]]) -> list[Candidate]:
    if not hits:
        return []
    rows = session.execute(
        select(Record.id, Record.source, Record.external_id).where(Record.id.in_([rid for _, rid in hits]))
    )
    names = {rid: (source, external_id) for rid, source, external_id in rows}
    calibration = active_calibration(session, dataset)
    return [
        Candidate(
            source=names[rid][0],
            id=names[rid][1],
            score=min(score, 1.0),
            match=None if calibration is None else score >= calibration.threshold,
        )
        for score, rid in hits
        if rid in names  # a record deleted since the index saw it is skipped
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
    session.add(
        Calibration(
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
    )
    return CalibrateOut(
        threshold=choice.threshold,
        precision=choice.precision,
        recall=choice.recall,
        f1=choice.f1,
        pairs=len(body.pairs),
        positives=int(labels.sum()),
        objective=body.objective,
    )


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
