"""Records put back in the encoding queue (``pending``, no claim, no vector): new content, a dataset's new
encoder or rendering, vectors of other weights found at start-up, or ``POST /datasets/{name}/requeue`` and
``llmatch requeue``. A storage operation, shared by the API and the CLI; the worker's queue
(``encoder_worker/queue.py``) claims them from there."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from llmatch.models import FAILED, PENDING, Record
from llmatch.vectors import delete_orphaned_embeddings

log = logging.getLogger("llmatch.worker")


def requeue(session: Session, which: ColumnElement[bool], *, reset_attempts: bool = True) -> int:
    """Put the records matching ``which`` back to pending with nothing left of a claim (token, lease, the group
    sizes of an encoder call) or of their last vector and error; with ``reset_attempts``, their attempts start
    again at 0. Their old vectors are deleted unless another record (of any dataset) still holds them. Returns
    how many records. The one way records go back to the queue: a claim field kept from before would charge the
    new version for a death it did not cause, and a vector left behind would be kept forever."""
    previous = session.scalars(
        select(Record.embedding_id).where(which, Record.embedding_id.is_not(None)).distinct()
    ).all()
    values: dict[str, Any] = {
        "status": PENDING,
        "embedding_id": None,
        "claim_token": None,
        "lease_until": None,
        "inflight_batch": None,
        "batch_limit": None,
        "error": None,
    }
    if reset_attempts:
        values["attempts"] = 0
    result = session.execute(update(Record).where(which).values(**values).execution_options(synchronize_session=False))
    delete_orphans(session, previous)
    return result.rowcount or 0


def delete_orphans(session: Session, embedding_ids: Sequence[int]) -> None:
    """Delete those of these vectors that no record references now. One that a worker's store takes up again
    meanwhile (its text came back) is kept: the conflict undoes only this step, not the caller's transaction."""
    if not embedding_ids:
        return
    try:
        with session.begin_nested():
            deleted = delete_orphaned_embeddings(session, embedding_ids)
    except (IntegrityError, OperationalError):
        log.info("vectors left for a later clean-up: a concurrent store references them again", exc_info=True)
        return
    log.debug("deleted %d vectors that no record references any more", deleted)


def requeue_failed(session: Session, dataset_id: int) -> int:
    """Put a dataset's failed records back in the queue with their attempts reset; returns how many."""
    return requeue(session, and_(Record.dataset_id == dataset_id, Record.status == FAILED))
