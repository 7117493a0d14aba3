"""/datasets/{name}/labels and /review: people's labels, and the pairs most worth labelling next."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from llmatch.db import transaction
from service import audit, auth
from service import labels as logic
from service import review as reviewing
from service.datasets import get_dataset
from service.deps import DatasetPath, State
from service.schemas import LabelsIn, LabelsOut, LabelsStored, ReviewOut

router = APIRouter(prefix="/datasets", tags=["labels"])


@router.put("/{name}/labels", response_model=LabelsStored)
def put_labels(name: DatasetPath, body: LabelsIn, state: State, _: auth.Write) -> LabelsStored:
    """Store labels; the latest label of a pair wins, whichever record it names first."""
    with transaction(state.session_factory) as session:
        dataset = get_dataset(session, name, lock=True)
        return logic.put_labels(session, dataset, body.pairs, state.settings.max_dataset_labels)


@router.get("/{name}/labels", response_model=LabelsOut)
def get_labels(name: DatasetPath, state: State, _: auth.Read) -> LabelsOut:
    with state.session_factory() as session:
        return logic.list_labels(session, get_dataset(session, name))


@router.delete("/{name}/labels", status_code=status.HTTP_204_NO_CONTENT)
def delete_labels(name: DatasetPath, state: State, access: auth.Write) -> Response:
    with transaction(state.session_factory) as session:
        logic.delete_labels(session, get_dataset(session, name, lock=True))
        audit.record(session, access.actor, "labels.delete", name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{name}/review", response_model=ReviewOut)
def get_review(
    name: DatasetPath,
    state: State,
    _: auth.Read,
    limit: Annotated[int, Query(ge=1, le=5000)] = 20,
    strategy: reviewing.Strategy = "teaching",
) -> ReviewOut:
    """Unlabelled candidate pairs the current model is least sure of first (nearest the threshold; the middle of the
    scores while uncalibrated), spread over records, one in five exploring away from the threshold (``teaching``);
    ``strategy`` selects another order."""
    settings = state.settings

    def search() -> ReviewOut:
        with state.session_factory() as session:
            dataset = get_dataset(session, name)
            state.registry.check_current(dataset.id, dataset.serving_encoder)
            return reviewing.review(
                session,
                state.registry,
                dataset,
                limit,
                settings.review_candidates,
                strategy,
                settings.review_max_records,
            )

    return state.searching(search)
