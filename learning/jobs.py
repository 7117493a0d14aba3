"""Training jobs in the database: start (one unfinished per dataset), read, cancel, and the worker's side (claim
under a lease, renew, report progress, finish). Every write a worker makes is guarded by its claim token, so a
worker whose lease ran out (and whose job another worker took) changes nothing any more."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from learning.errors import JobUnfinished
from learning.labels import check_enough, usable_labels
from llmatch.db import transaction
from llmatch.models import (
    CANCELLED,
    JOB_FAILED,
    QUEUED,
    TRAINING,
    UNFINISHED_JOB_STATUSES,
    Dataset,
    TrainingJob,
)


def utcnow() -> datetime:
    """Naive UTC, as the database's CURRENT_TIMESTAMP stores it."""
    return datetime.utcnow()  # noqa: DTZ003 - the columns are naive UTC


def start_job(session: Session, dataset: Dataset, options: dict[str, Any] | None = None) -> TrainingJob:
    """Queue a training job for ``dataset``; ``JobUnfinished`` while one is, ``TooFewLabels`` when too few."""
    running = unfinished_job(session, dataset.id)
    if running is not None:
        raise JobUnfinished(dataset.name, running.id, running.status)
    labels = usable_labels(session, dataset.id)
    check_enough(dataset.name, labels)
    job = TrainingJob(
        id=uuid.uuid4().hex,
        dataset_id=dataset.id,
        status=QUEUED,
        progress=0.0,
        labels=len(labels),
        options=options or {},
        cancel_requested=False,
        attempts=0,
    )
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:  # another request started one between the check and the insert
        running = unfinished_job(session, dataset.id)
        raise JobUnfinished(
            dataset.name, running.id if running else "?", running.status if running else QUEUED
        ) from None
    return job


def unfinished_job(session: Session, dataset_id: int, *, lock: bool = False) -> TrainingJob | None:
    """The dataset's unfinished job (there is at most one); ``lock`` takes its row for update."""
    query = select(TrainingJob).where(
        TrainingJob.dataset_id == dataset_id, TrainingJob.status.in_(UNFINISHED_JOB_STATUSES)
    )
    return session.scalar(query.with_for_update() if lock else query)


def latest_job(session: Session, dataset_id: int) -> TrainingJob | None:
    """The dataset's most recent job (an unfinished one first: there is at most one)."""
    return unfinished_job(session, dataset_id) or session.scalar(
        select(TrainingJob)
        .where(TrainingJob.dataset_id == dataset_id)
        .order_by(TrainingJob.created_at.desc(), TrainingJob.finished_at.desc())
        .limit(1)
    )


def cancel_job(session: Session, dataset_id: int) -> TrainingJob | None:
    """Cancel the dataset's unfinished job: a queued one at once; a running one is asked to stop (its worker stops
    the training process and marks it cancelled). None when there is no unfinished job."""
    job = unfinished_job(session, dataset_id, lock=True)
    if job is None:
        return None
    if job.status == QUEUED and job.claim_token is None:
        job.status, job.finished_at, job.error = CANCELLED, utcnow(), "cancelled before it started"
    else:
        job.cancel_requested = True
    session.flush()
    return job


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    dataset_id: int
    token: str
    attempts: int


def claim_job(session_factory: sessionmaker[Session], lease_seconds: float, max_attempts: int) -> ClaimedJob | None:
    """Take the oldest queued job, or one whose worker's lease ran out (its worker died): that one runs again
    from the start while it has attempts left, else it fails saying why. None when there is nothing to run."""
    now = utcnow()
    with transaction(session_factory) as session:
        runnable = or_(
            and_(TrainingJob.status == QUEUED, TrainingJob.claim_token.is_(None)),
            and_(TrainingJob.status.in_(UNFINISHED_JOB_STATUSES), TrainingJob.lease_until < now),
        )
        query = select(TrainingJob).where(runnable).order_by(TrainingJob.created_at).limit(1)
        job = session.scalar(query.with_for_update(skip_locked=True))
        if job is None:
            return None
        if job.cancel_requested:
            _end(job, CANCELLED, "cancelled while its worker was gone")
            return None
        if job.attempts >= max_attempts:
            _end(job, JOB_FAILED, f"the worker running it stopped before it finished, {job.attempts} times")
            return None
        token = uuid.uuid4().hex
        taken = session.execute(  # guarded: on SQLite the row lock above is no lock, and two workers may race
            update(TrainingJob)
            .where(TrainingJob.id == job.id, runnable)
            .values(
                status=TRAINING,
                claim_token=token,
                lease_until=now + timedelta(seconds=lease_seconds),
                attempts=TrainingJob.attempts + 1,
                progress=0.0,
                started_at=now,
                version=None,
                metrics=None,
                error=None,
            )
            .execution_options(synchronize_session=False)
        )
        if not taken.rowcount:
            return None
        session.refresh(job)
        return ClaimedJob(job.id, job.dataset_id, token, job.attempts)


def renew(session_factory: sessionmaker[Session], job_id: str, token: str, lease_seconds: float) -> bool:
    """Extend the lease of a job still held with ``token``; False when it is not (cancelled, taken, gone)."""
    with transaction(session_factory) as session:
        result = session.execute(
            update(TrainingJob)
            .where(_held(job_id, token))
            .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
        )
        return bool(result.rowcount)


def report(session_factory: sessionmaker[Session], job_id: str, token: str, **values: Any) -> bool:
    """Write progress or results (status, progress, version, metrics, ...) of a job held with ``token``; False
    when it is no longer held (the writer should stop)."""
    with transaction(session_factory) as session:
        result = session.execute(update(TrainingJob).where(_held(job_id, token)).values(**values))
        return bool(result.rowcount)


def cancel_requested(session_factory: sessionmaker[Session], job_id: str) -> bool:
    with session_factory() as session:
        return bool(session.scalar(select(TrainingJob.cancel_requested).where(TrainingJob.id == job_id)))


def finish(session: Session, job_id: str, token: str, status: str, **values: Any) -> bool:
    """End a held job (done, failed or cancelled) inside the caller's transaction; False when not held."""
    result = session.execute(
        update(TrainingJob)
        .where(_held(job_id, token))
        .values(status=status, finished_at=utcnow(), claim_token=None, lease_until=None, **values)
    )
    return bool(result.rowcount)


def give_back(session_factory: sessionmaker[Session], job_id: str, token: str, charge: bool = False) -> bool:
    """Put a held job back in the queue: uncharged when its worker shuts down; ``charge`` keeps the attempt
    counted (its process died: the next claim fails it once the attempts are spent)."""
    with transaction(session_factory) as session:
        result = session.execute(
            update(TrainingJob)
            .where(_held(job_id, token))
            .values(
                status=QUEUED,
                claim_token=None,
                lease_until=None,
                progress=0.0,
                attempts=TrainingJob.attempts - (0 if charge else 1),
            )
        )
        return bool(result.rowcount)


def _held(job_id: str, token: str):
    return and_(
        TrainingJob.id == job_id,
        TrainingJob.claim_token == token,
        TrainingJob.status.in_(UNFINISHED_JOB_STATUSES),
    )


def _end(job: TrainingJob, status: str, error: str | None) -> None:
    job.status, job.error, job.finished_at = status, error, utcnow()
    job.claim_token, job.lease_until = None, None
