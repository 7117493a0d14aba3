"""/datasets: configuration, status and calibration of matching problems."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from encoding.versions import remove_dataset_versions
from llmatch.db import transaction
from llmatch.requeue import requeue_failed
from service import audit, auth, decisions, entities, labels
from service import datasets as logic
from service.deps import DatasetPath, State
from service.schemas import (
    CalibrateIn,
    CalibrateOut,
    DatasetConfigIn,
    DatasetList,
    DatasetOut,
    RequeueIn,
    RequeueOut,
)

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.put("/{name}", response_model=DatasetOut, responses={201: {"model": DatasetOut}})
def put_dataset(
    name: DatasetPath, state: State, response: Response, access: auth.Manage, body: DatasetConfigIn | None = None
) -> DatasetOut:
    """Create (201) or update (200) a dataset; changes to its text re-queue its records, changes to its index
    options rebuild its loaded indexes (other processes follow within an index sync interval)."""
    body = body or DatasetConfigIn()
    with transaction(state.session_factory) as session:
        dataset, created = logic.put_dataset(session, state.pool, name, body, state.settings.default_encoder)
        action = "dataset.create" if created else "dataset.configure"
        audit.record(session, access.actor, action, name, body.model_dump(exclude_unset=True))
        response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        described = logic.describe(session, dataset, state.registry.policy, state.pool)
    if "index" in body.model_fields_set:
        state.synchronizer.follow_index_options()  # committed: this process's indexes switch now
    return described


@router.get("", response_model=DatasetList)
def list_datasets(state: State, access: auth.AnyKey) -> DatasetList:
    """The datasets this key can read."""
    with state.session_factory() as session:
        readable = [d for d in logic.all_datasets(session) if access.can(d.name, "read")]
        return DatasetList(datasets=[logic.describe(session, d, state.registry.policy, state.pool) for d in readable])


@router.get("/{name}", response_model=DatasetOut)
def get_dataset(name: DatasetPath, state: State, _: auth.Read) -> DatasetOut:
    with state.session_factory() as session:
        return logic.describe(session, logic.get_dataset(session, name), state.registry.policy, state.pool)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(name: DatasetPath, state: State, access: auth.Manage) -> Response:
    with transaction(state.session_factory) as session:
        dataset_id = logic.delete_dataset(session, name)
        audit.record(session, access.actor, "dataset.delete", name)
    state.registry.drop_dataset(dataset_id)
    remove_dataset_versions(state.settings.models_dir, name)  # the encoder versions its training jobs made
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{name}/calibrate", response_model=CalibrateOut)
def calibrate(name: DatasetPath, body: CalibrateIn, state: State, access: auth.Manage) -> CalibrateOut:
    """Choose the threshold maximising F1 on labelled pairs and fit score-to-probability; make it active."""
    with transaction(state.session_factory) as session:
        dataset = logic.get_dataset(session, name, lock=True)
        body = labels.calibration_body(session, dataset, body)  # {"from": "labels"}: the stored labels
        result = decisions.calibrate(session, dataset, state.pool.spec(dataset.serving_encoder).key, body)
        audit.record(
            session, access.actor, "dataset.calibrate", name, {"threshold": result.threshold, "pairs": result.pairs}
        )
    entities.refresh(state, dataset.id)  # regroup the dataset's entities on the new threshold
    return result


@router.post("/{name}/requeue", response_model=RequeueOut)
def requeue(name: DatasetPath, body: RequeueIn, state: State, _: auth.Write) -> RequeueOut:
    """Put the dataset's failed records back in the queue, their attempts reset (after fixing the cause)."""
    with transaction(state.session_factory) as session:
        dataset = logic.get_dataset(session, name, lock=True)
        return RequeueOut(requeued=requeue_failed(session, dataset.id))
