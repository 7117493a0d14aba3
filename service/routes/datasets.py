"""/datasets: configuration, status and calibration of matching problems."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from llmatch.db import transaction
from service import datasets as logic
from service import decisions
from service.deps import DatasetPath, State
from service.schemas import CalibrateIn, CalibrateOut, DatasetConfigIn, DatasetList, DatasetOut

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.put("/{name}", response_model=DatasetOut, responses={201: {"model": DatasetOut}})
def put_dataset(name: DatasetPath, state: State, response: Response, body: DatasetConfigIn | None = None) -> DatasetOut:
    """Create (201) or update (200) a dataset; changes to its text re-queue its records."""
    with transaction(state.session_factory) as session:
        dataset, created = logic.put_dataset(
            session, state.pool, name, body or DatasetConfigIn(), state.settings.default_encoder
        )
        response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return logic.describe(session, dataset)


@router.get("", response_model=DatasetList)
def list_datasets(state: State) -> DatasetList:
    with state.session_factory() as session:
        return DatasetList(datasets=[logic.describe(session, d) for d in logic.all_datasets(session)])


@router.get("/{name}", response_model=DatasetOut)
def get_dataset(name: DatasetPath, state: State) -> DatasetOut:
    with state.session_factory() as session:
        return logic.describe(session, logic.get_dataset(session, name))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(name: DatasetPath, state: State) -> Response:
    with transaction(state.session_factory) as session:
        dataset_id = logic.delete_dataset(session, name)
    state.registry.drop_dataset(dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{name}/calibrate", response_model=CalibrateOut)
def calibrate(name: DatasetPath, body: CalibrateIn, state: State) -> CalibrateOut:
    """Choose the threshold maximising F1 on labelled pairs and fit score-to-probability; make it active."""
    with transaction(state.session_factory) as session:
        dataset = logic.get_dataset(session, name, lock=True)
        return decisions.calibrate(session, dataset, state.pool.spec(dataset.encoder).key, body)
