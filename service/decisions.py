"""Match, candidates and calibration: cosine similarity over stored (or freshly encoded) vectors."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from encoding.encoder import EncoderInput
from encoding.recipe import Recipe, record_input
from encoding.registry import EncoderPool
from llmatch.models import ENCODED, Calibration, Dataset, Embedding, Record
from llmatch.vectors import from_bytes
from matching import calibration as calib
from matching.errors import UnknownSource
from matching.neighbours import Neighbour, dataset_sources, neighbours, target_sources
from matching.registry import IndexRegistry
from service.datasets import unknown_dataset
from service.errors import ApiError, Conflict, NotFound, printable, without_paths
from service.record_refs import record_conditions
from service.records import unknown_record
from service.schemas import (
    BatchPairIn,
    CalibrateIn,
    CalibrateOut,
    Candidate,
    CandidatesOut,
    InlineRecord,
    ItemError,
    ItemFailed,
    LabelledPair,
    MatchOut,
    RecordRef,
    RefOrInline,
)

CHUNK = 500  # rows per IN (...) list


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
    """The stored vectors of several records of a dataset; the first unknown (404) or not yet encoded (409)
    record, in the order given, is the error."""
    found = _stored_rows(session, dataset, refs)
    queries = []
    for source, record_id in refs:
        query = _stored_or_error(dataset, source, record_id, found.get((source, record_id)))
        if isinstance(query, ApiError):
            raise query
        queries.append(query)
    return queries


def _stored_rows(session: Session, dataset: Dataset, refs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    """Each known record of these (source, id) with its status, error and vector (None while not encoded), in
    queries of ``CHUNK`` records."""
    rows: dict[tuple[str, str], Any] = {}
    for condition in record_conditions(refs, CHUNK):
        found = session.execute(
            select(Record.id, Record.source, Record.external_id, Record.status, Record.error)
            .add_columns(Embedding.vector, Embedding.dim)
            .outerjoin(Embedding, Record.embedding_id == Embedding.id)
            .where(Record.dataset_id == dataset.id, condition)
        )
        rows.update({(row.source, row.external_id): row for row in found})
    return rows


def _stored_or_error(dataset: Dataset, source: str, record_id: str, row: Any) -> Query | ApiError:
    """The query of a stored record's row, or the error its absence (404) or status (409) is."""
    if row is None:
        return unknown_record(dataset, source, record_id)
    if row.status != ENCODED or row.vector is None:
        last_error = f" Last error: {without_paths(row.error)}" if row.error else ""
        return Conflict(
            f"Record {record_id!r} in source {source!r} is {row.status}, not encoded yet; "
            "retry once the encoder worker has processed it." + last_error
        )
    return Query(from_bytes(row.vector, row.dim), row.id, source)


@dataclass(frozen=True)
class ToEncode:
    """An inline record rendered for its dataset's encoder, to be encoded once no session is open."""

    encoder: str
    item: EncoderInput


def prepare_inline(session: Session, pool: EncoderPool, dataset: Dataset, record: InlineRecord) -> Query | ToEncode:
    """The vector of a record of this dataset with an identical text, or what to encode (inline records are
    never stored)."""
    made = record_input(record.attributes, Recipe.of_dataset(dataset, pool.max_text_chars))  # as the worker cuts
    key = pool.spec(dataset.serving_encoder).key
    cached = _dataset_vector(session, dataset, key, made.input_hash)
    if cached is not None:
        return Query(cached)
    return ToEncode(dataset.serving_encoder, made.item)


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
    """The cached vector of this text only if a record of ``dataset`` holds it (``_dataset_vectors``)."""
    return _dataset_vectors(session, dataset, encoder_key, {digest}).get(digest)


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
    ordered = sorted(refs)
    found = _stored_rows(session, dataset, ordered)
    unknown = [ref for ref in ordered if ref not in found]
    if unknown:
        raise NotFound(
            f"{len(unknown)} pair record(s) are unknown in dataset {dataset.name!r}, e.g. "
            f"{_names(unknown)}; ingest them first.",
            unknown=[list(r) for r in unknown[:100]],
        )
    waiting = [ref for ref, row in found.items() if row.status != ENCODED or row.vector is None]
    if waiting:
        raise Conflict(
            f"{len(waiting)} pair record(s) are not encoded yet, e.g. {_names(sorted(waiting))}; "
            "retry once the encoder worker has processed them.",
            not_encoded=[list(r) for r in sorted(waiting)[:100]],
        )
    return {ref: from_bytes(row.vector, row.dim) for ref, row in found.items()}


def _names(refs: list[tuple[str, str]]) -> str:
    return ", ".join(f"{source}/{rid}" for source, rid in refs[:5])


# ------------------------------------------------------------------------------------- batch forms (v1.2)


@dataclass(frozen=True)
class Problem:
    """Why one item of a batch gets no answer: the status and detail the single form would have answered."""

    status: int
    detail: str

    @classmethod
    def of(cls, error: ApiError) -> Problem:
        return cls(error.status_code, error.detail)

    def failed(self) -> ItemFailed:
        return ItemFailed(error=ItemError(status=self.status, detail=self.detail))


_REF_OR_INLINE: TypeAdapter[RecordRef | InlineRecord] = TypeAdapter(RefOrInline)


def parsed_items(values: Sequence[Any], model: type[BatchPairIn] | None = None) -> list[Any]:
    """Each item of a batch checked alone: a ref or inline record (a pair of them with ``model``), or the 422
    Problem it is."""
    items: list[Any] = []
    for at, value in enumerate(values):
        try:
            items.append(model.model_validate(value) if model else _REF_OR_INLINE.validate_python(value))
        except ValidationError as error:
            items.append(Problem(422, _item_sentence(at, error)))
    return items


def _item_sentence(at: int, error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if not str(part).startswith("function-"))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    return printable(f"Invalid item {at}: {where + ': ' if where else ''}{message}{more}.")


def prepare_many(
    session: Session, pool: EncoderPool, dataset: Dataset, items: Sequence[RecordRef | InlineRecord | Problem]
) -> list[Query | ToEncode | Problem]:
    """``prepare`` for many items in a few queries: stored records by their (source, id), inline ones rendered
    as the worker renders them and looked up in the dataset's own vectors; an unknown (404) or not yet encoded
    (409) record is the Problem in its place."""
    rows = _stored_rows(session, dataset, ((item.source, item.id) for item in items if isinstance(item, RecordRef)))
    recipe = Recipe.of_dataset(dataset, pool.max_text_chars)  # as the worker cuts
    made = {
        at: record_input(item.attributes, recipe) for at, item in enumerate(items) if isinstance(item, InlineRecord)
    }
    cached = _dataset_vectors(
        session, dataset, pool.spec(dataset.serving_encoder).key, {m.input_hash for m in made.values()}
    )
    prepared: list[Query | ToEncode | Problem] = []
    for at, item in enumerate(items):
        if isinstance(item, Problem):
            prepared.append(item)
        elif isinstance(item, RecordRef):
            query = _stored_or_error(dataset, item.source, item.id, rows.get((item.source, item.id)))
            prepared.append(Problem.of(query) if isinstance(query, ApiError) else query)
        else:
            vector = cached.get(made[at].input_hash)
            prepared.append(Query(vector) if vector is not None else ToEncode(dataset.serving_encoder, made[at].item))
    return prepared


def _dataset_vectors(session: Session, dataset: Dataset, encoder_key: str, digests: set[str]) -> dict[str, np.ndarray]:
    """Cached vectors of these texts, only those a record of ``dataset`` holds: the content cache is shared across
    datasets, and reusing another dataset's vector would reveal (by its speed) that the text is there."""
    held = select(Record.id).where(Record.dataset_id == dataset.id, Record.embedding_id == Embedding.id).exists()
    wanted = sorted(digests)
    found: dict[str, np.ndarray] = {}
    for start in range(0, len(wanted), CHUNK):
        rows = session.execute(
            select(Embedding.input_hash, Embedding.vector, Embedding.dim).where(
                Embedding.encoder_key == encoder_key, Embedding.input_hash.in_(wanted[start : start + CHUNK]), held
            )
        )
        found.update({row.input_hash: from_bytes(row.vector, row.dim) for row in rows})
    return found


def encoded_many(pool: EncoderPool, prepared: Sequence[Query | ToEncode | Problem]) -> list[Query | Problem]:
    """``encoded`` for many: every inline record left to encode, identical texts once, in ONE encoder call (one
    on-the-spot slot, the same cut as the single form). Call it with no session open."""
    todo = [item for item in prepared if isinstance(item, ToEncode)]
    if not todo:
        return list(prepared)  # type: ignore[arg-type]
    distinct = list(dict.fromkeys((item.item.instruction, item.item.text) for item in todo))
    inputs = {key: at for at, key in enumerate(distinct)}
    first = {(item.item.instruction, item.item.text): item.item for item in reversed(todo)}
    vectors = pool.encode(todo[0].encoder, [first[key] for key in distinct])
    return [
        Query(vectors[inputs[(item.item.instruction, item.item.text)]]) if isinstance(item, ToEncode) else item
        for item in prepared
    ]


def candidates_many(
    session: Session,
    registry: IndexRegistry,
    dataset: Dataset,
    calibration: Calibration | None,
    queries: Sequence[Query | Problem],
    k: int,
    target_source: str | None,
) -> list[CandidatesOut | ItemFailed]:
    """``candidates`` for many queries from one batched neighbour search (one index search per target source);
    an unknown ``target_source`` is a 404 for the whole batch, as it would be for every item."""
    known = dataset_sources(session, dataset.id)
    try:
        target_sources(known, None, target_source)
    except UnknownSource as error:
        raise NotFound(
            f"Dataset {dataset.name!r} has no source {error.source!r}; "
            f"its sources: {', '.join(error.known) or 'none yet'}."
        ) from error
    good = [query for query in queries if isinstance(query, Query)]
    found = iter(
        neighbours(
            session,
            registry,
            dataset.id,
            np.stack([query.vector for query in good]) if good else np.zeros((0, 1), dtype=np.float32),
            k,
            record_ids=[query.record_id for query in good],
            sources=[query.source for query in good],
            target=target_source,
            known=known,
        )
    )
    results: list[CandidatesOut | ItemFailed] = []
    for query in queries:
        if isinstance(query, Problem):
            results.append(query.failed())
            continue
        hits = next(found)[:k]
        results.append(
            CandidatesOut(
                candidates=[
                    Candidate(
                        source=hit.source,
                        id=hit.external_id,
                        score=hit.score,
                        match=None if calibration is None else hit.score >= calibration.threshold,
                    )
                    for hit in hits
                ]
            )
        )
    return results


def decisions_many(
    calibration: Calibration | None, sides: Sequence[Query | Problem], pairs: Sequence[BatchPairIn | Problem]
) -> list[MatchOut | ItemFailed]:
    """One decision per pair; ``sides`` holds each pair's left and right (in that order) for the pairs that
    parsed. A pair with a bad side answers that side's problem (the left one first)."""
    it = iter(sides)
    results: list[MatchOut | ItemFailed] = []
    for pair in pairs:
        if isinstance(pair, Problem):
            results.append(pair.failed())
            continue
        left, right = next(it), next(it)
        problem = left if isinstance(left, Problem) else right if isinstance(right, Problem) else None
        if problem is not None:
            results.append(problem.failed())
        else:
            results.append(decision(calibration, cosine(left.vector, right.vector)))  # type: ignore[union-attr]
    return results


# ------------------------------------------------------------------------------------- pair export (v1.2)

EXPORT_CHUNK_PAIRS = 50_000  # query records per chunk: about this many hits (chunk x k) in memory at once


def export_lines(
    session_factory: Any,
    registry: IndexRegistry,
    dataset: Dataset,
    calibration: Calibration | None,
    k: int,
    min_score: float | None,
    after: int,
    page_records: int,
) -> Iterator[str]:
    """NDJSON lines of every candidate pair of the dataset, each unordered pair once, then ``{"cursor"}``.

    The encoded records with ids from ``after`` are queried in record id order, at most ``page_records`` of
    them, in chunks (each chunk's vectors read from the database, one batched neighbour search per target
    source). A record's candidates are its ``k`` best, as GET /candidates answers them. The pair of x and y
    (record ids x < y) is written at x's query when y is among x's candidates, else at y's query (which searches
    x's candidates again to know): the same lines whatever the pages, so a resumed export writes what one pass
    would. The cursor is the next record id to query, null when none is left."""
    chunk = max(1, min(1_000, EXPORT_CHUNK_PAIRS // k))
    queried, next_id = 0, after
    with session_factory() as session:
        known = dataset_sources(session, dataset.id)
    while queried < page_records:
        with session_factory() as session:
            rows = _encoded_rows(session, dataset, next_id, min(chunk, page_records - queried))
            if not rows:
                yield json.dumps({"cursor": None}) + "\n"
                return
            found = _candidates_of(session, registry, dataset, rows, k, known)
            earlier = sorted(
                {hit.record_id for row, hits in zip(rows, found, strict=True) for hit in hits if hit.record_id < row.id}
            )
            written_there: dict[int, set[int]] = {}
            for start in range(0, len(earlier), chunk):
                others = _encoded_rows(session, dataset, None, None, earlier[start : start + chunk])
                for other, hits in zip(
                    others, _candidates_of(session, registry, dataset, others, k, known), strict=True
                ):
                    written_there[other.id] = {hit.record_id for hit in hits}
        lines = []
        for row, hits in zip(rows, found, strict=True):
            for hit in hits:
                if min_score is not None and hit.score < min_score:
                    continue
                if hit.record_id < row.id and row.id in written_there.get(hit.record_id, ()):
                    continue  # written at the other record's query
                sides = sorted([(row.source, row.external_id), (hit.source, hit.external_id)])
                answer = decision(calibration, hit.score)
                lines.append(
                    json.dumps(
                        {
                            "left": {"source": sides[0][0], "id": sides[0][1]},
                            "right": {"source": sides[1][0], "id": sides[1][1]},
                            "score": hit.score,
                            "match": answer.match,
                            "probability": answer.probability,
                        }
                    )
                    + "\n"
                )
        if lines:
            yield "".join(lines)
        queried += len(rows)
        next_id = rows[-1].id + 1
    with session_factory() as session:
        more = _encoded_rows(session, dataset, next_id, 1)
    yield json.dumps({"cursor": str(next_id) if more else None}) + "\n"


def _encoded_rows(
    session: Session, dataset: Dataset, after: int | None, limit: int | None, ids: Sequence[int] | None = None
) -> list[Any]:
    """Encoded records of the dataset with their vectors: from record id ``after`` in id order (``limit`` of
    them), or those of ``ids``."""
    query = (
        select(Record.id, Record.source, Record.external_id, Embedding.vector, Embedding.dim)
        .join(Embedding, Record.embedding_id == Embedding.id)
        .where(Record.dataset_id == dataset.id, Record.status == ENCODED)
    )
    if ids is not None:
        query = query.where(Record.id.in_(ids))
    if after is not None:
        query = query.where(Record.id >= after)
    query = query.order_by(Record.id)
    return list(session.execute(query if limit is None else query.limit(limit)))


def _candidates_of(
    session: Session, registry: IndexRegistry, dataset: Dataset, rows: Sequence[Any], k: int, known: list[str]
) -> list[list[Neighbour]]:
    """Each stored record's candidates as GET /candidates answers them (its k best), from one batched search."""
    if not rows:
        return []
    vectors = np.stack([from_bytes(row.vector, row.dim) for row in rows])
    found = neighbours(
        session,
        registry,
        dataset.id,
        vectors,
        k,
        record_ids=[row.id for row in rows],
        sources=[row.source for row in rows],
        known=known,
    )
    return [hits[:k] for hits in found]
