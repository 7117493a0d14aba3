"""/datasets/{name}/train: training jobs that make a new version of a dataset's encoder from its stored labels.

The routes only queue, read and cancel jobs (``learning.jobs``); an encoder worker runs them, never the API."""

from __future__ import annotations

from fastapi import APIRouter, status

from learning import jobs
from llmatch.db import transaction
from service import audit, auth
from service.datasets import get_dataset
from service.deps import DatasetPath, State
from service.errors import Conflict, NotFound
from service.schemas import TrainIn, TrainingJobOut

router = APIRouter(prefix="/datasets", tags=["learning"])


@router.post("/{name}/train", status_code=status.HTTP_202_ACCEPTED, response_model=TrainingJobOut)
def start_training(
    name: DatasetPath, state: State, access: auth.Manage, body: TrainIn | None = None
) -> TrainingJobOut:
    """Queue a job that trains a new version of the dataset's encoder on its stored labels (202). 409 while
    another job of the dataset is unfinished, or while the labels hold too few matches or non-matches."""
    options = body.model_dump(exclude_unset=True) if body is not None else {}
    with transaction(state.session_factory) as session:
        dataset = get_dataset(session, name, lock=True)
        job = jobs.start_job(session, dataset, options)
        audit.record(session, access.actor, "training.start", name, {"job": job.id, "labels": job.labels})
        return TrainingJobOut.model_validate(job)


@router.get("/{name}/train", response_model=TrainingJobOut)
def get_training(name: DatasetPath, state: State, _: auth.Read) -> TrainingJobOut:
    """The dataset's latest training job (its unfinished one, if any)."""
    with state.session_factory() as session:
        job = jobs.latest_job(session, get_dataset(session, name).id)
        if job is None:
            raise no_job(name)
        return TrainingJobOut.model_validate(job)


@router.delete("/{name}/train", response_model=TrainingJobOut)
def cancel_training(name: DatasetPath, state: State, access: auth.Manage) -> TrainingJobOut:
    """Cancel the dataset's unfinished job: a queued one ends at once, a running one is asked to stop
    (``cancel_requested``) and ends ``cancelled`` when its worker has stopped. The serving version stays."""
    with transaction(state.session_factory) as session:
        dataset = get_dataset(session, name, lock=True)
        job = jobs.cancel_job(session, dataset.id)
        if job is None:
            latest = jobs.latest_job(session, dataset.id)
            if latest is None:
                raise no_job(name)
            raise Conflict(
                f"Training job {latest.id} of dataset {name!r} has already ended ({latest.status}); there is no "
                f"unfinished job to cancel."
            )
        audit.record(session, access.actor, "training.cancel", name, {"job": job.id, "status": job.status})
        return TrainingJobOut.model_validate(job)


def no_job(name: str) -> NotFound:
    return NotFound(f"Dataset {name!r} has no training job yet; start one with POST /datasets/{name}/train.")
