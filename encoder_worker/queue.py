"""The encoding queue: records with status ``pending``, claimed under a short lease that the claiming worker
renews while it is alive (measured on the database's clock). A worker that dies loses nothing: when its lease
runs out the records are claimed again. Before each encoder call the worker notes which records are in it
(``inflight_batch``), so the next claimer knows whether a dead worker was encoding a record alone (the record is
blamed: one attempt) or in a group (no one is blamed; the records are encoded alone next time). Once the encoder
has returned, the records are marked so (``inflight_batch`` 0): a death while storing blames no one. Reading and
rendering a claim is bookkept the same way: the whole claim is the group until its records are rendered, so a
worker killed by a huge record (out of memory) while reading it charges that record, not the next worker."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, LargeBinary, Row, Text, and_, case, cast, func, insert, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from encoding.recipe import Recipe, record_input
from llmatch.db import db_now, transaction
from llmatch.models import ENCODED, FAILED, PENDING, Dataset, IndexChange, Record

MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class ClaimedRecord:
    """A claimed record, rendered for its dataset's encoder."""

    record_id: int
    dataset_id: int
    source: str
    encoder: str
    instruction: str | None
    text: str
    input_hash: str
    attempts: int
    batch_limit: int | None = None  # encode in groups of at most this many (after a worker died on its group)


@dataclass(frozen=True)
class Claim:
    token: str
    records: list[ClaimedRecord]


def crash_error(attempts: int) -> str:
    return (
        f"the encoder worker died {attempts} times while reading or encoding this record alone (out of memory, or a "
        "crash inside the model); fix the cause, then requeue it (POST /datasets/{name}/requeue or `llmatch requeue`)"
    )


def settle_expired(session: Session, max_attempts: int) -> int:
    """Release the records of claims whose lease ran out (their worker died or hung); returns how many.

    A record that was being read or encoded alone when its worker died is charged an attempt, and fails once it
    has used ``max_attempts``; one that was in a group of n is claimed and encoded next in groups of at most
    n // 4; one not yet started, or whose encoder call had returned (a death while storing), is just freed."""
    now = db_now(session)
    expired = and_(Record.status == PENDING, Record.claim_token.is_not(None), Record.lease_until < now)
    freed = 0
    for condition, values in (
        (Record.inflight_batch == 1, {"attempts": Record.attempts + 1, "batch_limit": 1}),
        (
            Record.inflight_batch > 1,
            {"batch_limit": case((Record.inflight_batch < 8, 1), else_=Record.inflight_batch // 4)},
        ),
        (or_(Record.inflight_batch.is_(None), Record.inflight_batch == 0), {}),
    ):
        result = session.execute(
            update(Record)
            .where(expired, condition)
            .values(claim_token=None, lease_until=None, inflight_batch=None, **values)
            .execution_options(synchronize_session=False)
        )
        freed += result.rowcount or 0
    crashed = and_(Record.status == PENDING, Record.claim_token.is_(None), Record.attempts >= max_attempts)
    for attempts in session.scalars(select(Record.attempts).where(crashed).distinct()).all():
        session.execute(
            update(Record)
            .where(crashed, Record.attempts == attempts)
            .values(status=FAILED, error=crash_error(attempts), batch_limit=None)
            .execution_options(synchronize_session=False)
        )
    return freed


def claim_batch(
    session_factory: sessionmaker[Session],
    batch_size: int,
    lease_seconds: float,
    max_attempts: int = 3,
    max_bytes: int | None = None,
    max_text_chars: int | None = None,
) -> Claim:
    """Claim up to ``batch_size`` pending records that nobody holds and whose retry delay (if any) is over, and
    render them cut to ``max_text_chars`` (the encoder's cut: the text and its hash are those encoded).

    The claim stops before the records' stored attributes pass ``max_bytes`` (it always takes one), and holds
    no more records than the smallest ``batch_limit`` among them. It is committed before any record is read,
    with the claim noted as the group in flight, and the note is cleared once every record is rendered: a
    worker that dies in between (out of memory on a huge record) has its claim blamed and split as after a
    death while encoding, where a rolled-back claim would hand the same record to the next worker to die on."""
    with transaction(session_factory) as session:
        token, ids = _take(session, batch_size, lease_seconds, max_attempts, max_bytes)
    if not ids:
        return Claim(token, [])
    with session_factory() as session:
        records = _read(session, ids, max_text_chars)
    with transaction(session_factory) as session:
        session.execute(
            update(Record)
            .where(Record.id.in_(ids), Record.claim_token == token)
            .values(inflight_batch=None)
            .execution_options(synchronize_session=False)
        )
    return Claim(token, records)


def _take(
    session: Session, batch_size: int, lease_seconds: float, max_attempts: int, max_bytes: int | None
) -> tuple[str, list[int]]:
    """Mark the records of a new claim claimed and being read (in flight as one group); their ids, in order."""
    settle_expired(session, max_attempts)
    now = db_now(session)
    token = uuid.uuid4().hex
    rows = session.execute(
        select(Record.id, Record.batch_limit, _stored_bytes(session))
        .where(
            Record.status == PENDING,
            Record.claim_token.is_(None),
            or_(Record.lease_until.is_(None), Record.lease_until < now),
        )
        .order_by(Record.id)
        .limit(batch_size)
        .with_for_update(skip_locked=True)
    ).all()
    ids = _fitting(rows, max_bytes)
    if ids:
        session.execute(
            update(Record)
            .where(Record.id.in_(ids))
            .values(claim_token=token, lease_until=now + timedelta(seconds=lease_seconds), inflight_batch=len(ids))
            .execution_options(synchronize_session=False)
        )
    return token, ids


def _stored_bytes(session: Session) -> ColumnElement[int]:
    """The size in bytes of a record's stored attributes (their JSON text), measured by the database."""
    if session.get_bind().dialect.name == "sqlite":
        return func.length(cast(Record.attributes, LargeBinary))
    return func.octet_length(cast(Record.attributes, Text))


def _fitting(rows: Sequence[Row[tuple[int, int | None, int | None]]], max_bytes: int | None) -> list[int]:
    """The ids of the first rows whose stored attributes stay within ``max_bytes`` and that are no more than the
    smallest ``batch_limit`` among them; at least the first row's."""
    taken: list[int] = []
    total, limit = 0, None
    for record_id, batch_limit, size in rows:
        total += size or 0
        if batch_limit is not None:
            limit = batch_limit if limit is None else min(limit, batch_limit)
        over_bytes = max_bytes is not None and total > max_bytes
        if taken and (over_bytes or (limit is not None and len(taken) >= limit)):
            break
        taken.append(record_id)
    return taken


def _read(session: Session, ids: list[int], max_text_chars: int | None) -> list[ClaimedRecord]:
    """The claimed records rendered for their datasets' encoders, in id order."""
    rows = session.execute(select(Record, Dataset).join(Dataset).where(Record.id.in_(ids)).order_by(Record.id))
    return [_rendered(record, dataset, max_text_chars) for record, dataset in rows]


def _rendered(record: Record, dataset: Dataset, max_text_chars: int | None) -> ClaimedRecord:
    made = record_input(record.attributes, Recipe.of_dataset(dataset, max_text_chars))
    return ClaimedRecord(
        record_id=record.id,
        dataset_id=dataset.id,
        source=record.source,
        encoder=dataset.serving_encoder,
        instruction=made.instruction,
        text=made.text,
        input_hash=made.input_hash,
        attempts=record.attempts,
        batch_limit=record.batch_limit,
    )


def renew(session: Session, token: str, lease_seconds: float) -> int:
    """Extend the lease of a live claim's unfinished records; returns how many it renewed.

    Rows another transaction has locked are skipped, not waited for: they are the worker's own records being
    stored (marked encoded, or given back) by its database thread. Waiting for them let the heartbeat and that
    thread lock the same rows in opposite orders on PostgreSQL, and the deadlock cost the heartbeat its beat;
    a few lost beats in a row ended a live worker's lease, and another worker encoded the batch again. A row
    skipped now is renewed by the next beat if it is still pending."""
    until = db_now(session) + timedelta(seconds=lease_seconds)
    unlocked = (
        select(Record.id)
        .where(Record.claim_token == token, Record.status == PENDING)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    result = session.execute(
        update(Record)
        .where(Record.id.in_(unlocked))
        .values(lease_until=until)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount or 0


def mark_inflight(session: Session, token: str, records: Sequence[ClaimedRecord], texts: int) -> None:
    """Note that these records go into one encoder call of ``texts`` distinct texts (1: alone)."""
    session.execute(
        update(Record)
        .where(Record.id.in_([r.record_id for r in records]), Record.claim_token == token)
        .values(inflight_batch=texts)
        .execution_options(synchronize_session=False)
    )


def mark_encoded(session: Session, token: str, records: Sequence[ClaimedRecord]) -> None:
    """The encoder call holding these records returned: if their worker dies now, they were not the cause."""
    session.execute(
        update(Record)
        .where(
            Record.id.in_([r.record_id for r in records]),
            Record.claim_token == token,
            Record.inflight_batch.is_not(None),
        )
        .values(inflight_batch=0)
        .execution_options(synchronize_session=False)
    )


def complete(session: Session, token: str, done: Sequence[tuple[ClaimedRecord, int]]) -> set[int]:
    """Mark claimed records encoded with their embedding ids and log them for the indexes (one statement for
    each, whatever the number of records); returns the ids of those the claim still held (the others were
    changed, deleted or re-queued meanwhile)."""
    if not done:
        return set()
    embedding_of = {record.record_id: embedding_id for record, embedding_id in done}
    held = set(
        session.scalars(
            update(Record)
            .where(Record.id.in_(embedding_of), Record.claim_token == token)
            .values(
                status=ENCODED,
                embedding_id=case(embedding_of, value=Record.id),
                claim_token=None,
                lease_until=None,
                inflight_batch=None,
                batch_limit=None,
                encoded_at=db_now(session),
                error=None,
            )
            .returning(Record.id)
            .execution_options(synchronize_session=False)
        )
    )
    changes = [
        {"dataset_id": r.dataset_id, "source": r.source, "record_id": r.record_id, "embedding_id": embedding_id}
        for r, embedding_id in done
        if r.record_id in held
    ]
    if changes:
        session.execute(insert(IndexChange), changes)
    return held


def release(
    session: Session, token: str, record: ClaimedRecord, error: str, max_attempts: int, retry_after_seconds: float
) -> str:
    """Give a record back after an encoder error of its own: one attempt spent; pending again (retried after a
    delay) or, past ``max_attempts``, failed for good."""
    final = record.attempts + 1 >= max_attempts
    values: dict[str, Any] = {
        "claim_token": None,
        "inflight_batch": None,
        "error": error[:MAX_ERROR_CHARS],
        "attempts": Record.attempts + 1,
    }
    if final:
        values.update(status=FAILED, lease_until=None, batch_limit=None)
    else:
        values.update(lease_until=db_now(session) + timedelta(seconds=retry_after_seconds), batch_limit=1)
    session.execute(
        update(Record)
        .where(Record.id == record.record_id, Record.claim_token == token)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return FAILED if final else PENDING


def give_back(
    session: Session, token: str, records: Sequence[ClaimedRecord], error: str, retry_after_seconds: float
) -> int:
    """Return records untouched by their own fault (the encoder is unavailable): no attempt is spent; they wait
    ``retry_after_seconds`` and keep the error so that GET /records shows why. Returns how many."""
    result = session.execute(
        update(Record)
        .where(Record.id.in_([r.record_id for r in records]), Record.claim_token == token)
        .values(
            claim_token=None,
            inflight_batch=None,
            error=error[:MAX_ERROR_CHARS],
            lease_until=db_now(session) + timedelta(seconds=retry_after_seconds),
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount or 0


def unclaim(session: Session, token: str, records: Sequence[ClaimedRecord]) -> None:
    """Let go of claimed records that were not worked on (a prefetched claim when the worker stops)."""
    session.execute(
        update(Record)
        .where(Record.id.in_([r.record_id for r in records]), Record.claim_token == token)
        .values(claim_token=None, lease_until=None, inflight_batch=None)
        .execution_options(synchronize_session=False)
    )
