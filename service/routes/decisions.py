"""/match and /candidates: decisions by cosine similarity."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import AfterValidator

from service import auth
from service import decisions as logic
from service import explain as explaining
from service.datasets import get_dataset
from service.deps import State
from service.schemas import (
    DATASET_NAME,
    SOURCE_NAME,
    BatchPairIn,
    CandidatesBatchOut,
    CandidatesOut,
    CandidatesRequest,
    MatchBatchOut,
    MatchOut,
    MatchRequest,
    RecordRef,
    storable_id,
)

router = APIRouter(tags=["decisions"])

DatasetQuery = Annotated[str, Query(pattern=DATASET_NAME)]
SourceQuery = Annotated[str, Query(pattern=SOURCE_NAME)]
IdQuery = Annotated[str, Query(min_length=1, max_length=256), AfterValidator(storable_id)]


@router.get("/match", response_model=MatchOut)
def get_match(
    dataset: DatasetQuery,
    left_source: SourceQuery,
    left_id: IdQuery,
    right_source: SourceQuery,
    right_id: IdQuery,
    state: State,
    _: auth.Read,
    explain: bool = False,
) -> MatchOut:
    """Cosine similarity of two stored records, with the calibrated decision and probability."""
    with state.session_factory() as session:
        found, calibration = logic.dataset_and_calibration(session, dataset)
        left, right = logic.stored_queries(session, found, [(left_source, left_id), (right_source, right_id)])
        answer = logic.decision(calibration, logic.cosine(left.vector, right.vector))
        refs = (RecordRef(source=left_source, id=left_id), RecordRef(source=right_source, id=right_id))
        sides = [explaining.attributes_of(session, found, ref) for ref in refs] if explain else []
    if explain:
        limits = explaining.ExplanationLimits.from_settings(state.settings)
        answer.explanation = explaining.explain(state.session_factory, state.pool, found, *sides, limits)
    return answer


@router.post("/match", response_model=MatchOut | MatchBatchOut)
def post_match(body: MatchRequest, state: State, _: auth.Read) -> MatchOut | MatchBatchOut:
    """Like GET /match; inline records are encoded on the spot and not stored. With ``pairs`` (1 to 10,000)
    instead of ``left``/``right``: one decision per pair, in the order given, a bad pair's error in its place."""
    if body.pairs is not None:
        return _match_batch(body, state)
    assert body.left is not None and body.right is not None  # the single form, checked by MatchIn
    with state.session_factory() as session:
        found = get_dataset(session, body.dataset)
        prepared = [logic.prepare(session, state.pool, found, side) for side in (body.left, body.right)]
        sides = [explaining.attributes_of(session, found, side) for side in (body.left, body.right)]
    left, right = (logic.encoded(state.pool, side) for side in prepared)  # no session open while encoding
    with state.session_factory() as session:
        answer = logic.decide(session, found, logic.cosine(left.vector, right.vector))
    if body.explain:
        limits = explaining.ExplanationLimits.from_settings(state.settings)
        answer.explanation = explaining.explain(state.session_factory, state.pool, found, *sides, limits)
    return answer


@router.get("/candidates", response_model=CandidatesOut)
def get_candidates(
    dataset: DatasetQuery,
    source: SourceQuery,
    id: IdQuery,
    state: State,
    _: auth.Read,
    k: Annotated[int, Query(ge=1, le=1000)] = 10,
    target_source: Annotated[str | None, Query(pattern=SOURCE_NAME)] = None,
) -> CandidatesOut:
    """Blocking: the k nearest records of the target sources to a stored record."""

    def search() -> list:
        with state.session_factory() as session:
            found, calibration = logic.dataset_and_calibration(session, dataset)
            state.registry.check_current(found.id, found.serving_encoder)
            query = logic.stored_query(session, found, source, id)
            return logic.candidates(session, state.registry, found, calibration, query, k, target_source)

    return CandidatesOut(candidates=state.searching(search))


@router.post("/candidates", response_model=CandidatesOut | CandidatesBatchOut)
def post_candidates(body: CandidatesRequest, state: State, _: auth.Read) -> CandidatesOut | CandidatesBatchOut:
    """Blocking for a new record given inline (encoded on the spot, not stored). With ``records`` (1 to 1,000
    stored refs or inline records) instead of ``record``: one candidate list per record, in the order given, from
    one batched index search, a bad record's error in its place."""
    if body.records is not None:
        return _candidates_batch(body, state)
    assert body.record is not None  # the single form, checked by CandidatesIn
    with state.session_factory() as session:
        found = get_dataset(session, body.dataset)
        prepared = logic.prepare_inline(session, state.pool, found, body.record)
    query = logic.encoded(state.pool, prepared)  # no session open while encoding

    def search() -> list:
        with state.session_factory() as session:
            calibration = logic.active_calibration(session, found)
            state.registry.check_current(found.id, found.serving_encoder)  # the version the query was encoded by
            return logic.candidates(session, state.registry, found, calibration, query, body.k, body.target_source)

    return CandidatesOut(candidates=state.searching(search))


def _candidates_batch(body: CandidatesRequest, state: State) -> CandidatesBatchOut:
    items = logic.parsed_items(body.records or [])
    with state.session_factory() as session:
        found = get_dataset(session, body.dataset)
        prepared = logic.prepare_many(session, state.pool, found, items)
    queries = logic.encoded_many(state.pool, prepared)  # one encoder call, no session open

    def search() -> list:
        with state.session_factory() as session:
            calibration = logic.active_calibration(session, found)
            state.registry.check_current(found.id, found.serving_encoder)  # the version the queries were encoded by
            return logic.candidates_many(
                session, state.registry, found, calibration, queries, body.k, body.target_source
            )

    return CandidatesBatchOut(results=state.searching(search))


def _match_batch(body: MatchRequest, state: State) -> MatchBatchOut:
    pairs = logic.parsed_items(body.pairs or [], BatchPairIn)
    sides = [side for pair in pairs if isinstance(pair, BatchPairIn) for side in (pair.left, pair.right)]
    with state.session_factory() as session:
        found = get_dataset(session, body.dataset)
        prepared = logic.prepare_many(session, state.pool, found, sides)
    queries = logic.encoded_many(state.pool, prepared)  # one encoder call, no session open
    with state.session_factory() as session:
        calibration = logic.active_calibration(session, found)
    return MatchBatchOut(results=logic.decisions_many(calibration, queries, pairs))
