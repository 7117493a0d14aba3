"""/match and /candidates: decisions by cosine similarity."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service import decisions as logic
from service.datasets import get_dataset
from service.deps import State
from service.schemas import DATASET_NAME, SOURCE_NAME, CandidatesIn, CandidatesOut, MatchIn, MatchOut

router = APIRouter(tags=["decisions"])

DatasetQuery = Annotated[str, Query(pattern=DATASET_NAME)]
SourceQuery = Annotated[str, Query(pattern=SOURCE_NAME)]
IdQuery = Annotated[str, Query(min_length=1, max_length=256)]


@router.get("/match", response_model=MatchOut)
def get_match(
    dataset: DatasetQuery,
    left_source: SourceQuery,
    left_id: IdQuery,
    right_source: SourceQuery,
    right_id: IdQuery,
    state: State,
) -> MatchOut:
    """Cosine similarity of two stored records, with the calibrated decision and probability."""
    with state.session_factory() as session:
        found = get_dataset(session, dataset)
        left = logic.stored_query(session, found, left_source, left_id)
        right = logic.stored_query(session, found, right_source, right_id)
        return logic.decide(session, found, logic.cosine(left.vector, right.vector))


@router.post("/match", response_model=MatchOut)
def post_match(body: MatchIn, state: State) -> MatchOut:
    """Like GET /match; inline records are encoded on the spot and not stored."""
    with state.session_factory() as session:
        found = get_dataset(session, body.dataset)
        left = logic.resolve(session, state.pool, found, body.left)
        right = logic.resolve(session, state.pool, found, body.right)
        return logic.decide(session, found, logic.cosine(left.vector, right.vector))


@router.get("/candidates", response_model=CandidatesOut)
def get_candidates(
    dataset: DatasetQuery,
    source: SourceQuery,
    id: IdQuery,
    state: State,
    k: Annotated[int, Query(ge=1, le=1000)] = 10,
    target_source: Annotated[str | None, Query(pattern=SOURCE_NAME)] = None,
) -> CandidatesOut:
    """Blocking: the k nearest records of the target sources to a stored record."""
    with state.session_factory() as session:
        found = get_dataset(session, dataset)
        query = logic.stored_query(session, found, source, id)
        return CandidatesOut(candidates=logic.candidates(session, state.registry, found, query, k, target_source))


@router.post("/candidates", response_model=CandidatesOut)
def post_candidates(body: CandidatesIn, state: State) -> CandidatesOut:
    """Blocking for a new record given inline (encoded on the spot, not stored)."""
    with state.session_factory() as session:
        found = get_dataset(session, body.dataset)
        query = logic.inline_query(session, state.pool, found, body.record)
        hits = logic.candidates(session, state.registry, found, query, body.k, body.target_source)
        return CandidatesOut(candidates=hits)
