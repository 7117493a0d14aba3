"""The encoding queue: records with status ``pending``, claimed under a lease so that a worker that dies
mid-batch loses nothing (the lease runs out and another worker claims them again)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from encoder_worker.render import RenderConfig, input_hash, render
from llmatch.models import ENCODED, FAILED, PENDING, Dataset, IndexChange, Record


def utcnow() -> datetime:
    """Naive UTC, the form timestamps are stored in."""
    return datetime.now(UTC).replace(tzinfo=None)


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


@dataclass(frozen=True)
class Claim:
    token: str
    records: list[ClaimedRecord]


def claim_batch(session: Session, batch_size: int, lease_seconds: float) -> Claim:
    """Claim up to ``batch_size`` pending records whose lease (if any) has run out."""
    now = utcnow()
    token = uuid.uuid4().hex
    ids = session.scalars(
        select(Record.id)
        .where(Record.status == PENDING, or_(Record.lease_until.is_(None), Record.lease_until < now))
        .order_by(Record.id)
        .limit(batch_size)
        .with_for_update(skip_locked=True)
    ).all()
    if not ids:
        return Claim(token, [])
    session.execute(
        update(Record)
        .where(Record.id.in_(ids))
        .values(claim_token=token, lease_until=now + timedelta(seconds=lease_seconds), attempts=Record.attempts + 1)
    )
    rows = session.execute(select(Record, Dataset).join(Dataset).where(Record.id.in_(ids))).all()
    return Claim(token, [_rendered(record, dataset) for record, dataset in rows])


def _rendered(record: Record, dataset: Dataset) -> ClaimedRecord:
    config = render_config(dataset)
    text = render(record.attributes, config, dataset.seen_attributes)
    return ClaimedRecord(
        record_id=record.id,
        dataset_id=dataset.id,
        source=record.source,
        encoder=dataset.encoder,
        instruction=config.instruction,
        text=text,
        input_hash=input_hash(config.instruction, text),
        attempts=record.attempts,
    )


def render_config(dataset: Dataset) -> RenderConfig:
    return RenderConfig(dataset.serialization, dataset.attributes, dataset.instruction)


def complete(session: Session, token: str, record: ClaimedRecord, embedding_id: int) -> bool:
    """Mark a claimed record encoded; False when the claim was lost (record changed, deleted or re-queued)."""
    result = session.execute(
        update(Record)
        .where(Record.id == record.record_id, Record.claim_token == token)
        .values(
            status=ENCODED,
            embedding_id=embedding_id,
            claim_token=None,
            lease_until=None,
            encoded_at=utcnow(),
            error=None,
        )
    )
    if result.rowcount != 1:
        return False
    session.add(
        IndexChange(
            dataset_id=record.dataset_id, source=record.source, record_id=record.record_id, embedding_id=embedding_id
        )
    )
    return True


def release(
    session: Session, token: str, record: ClaimedRecord, error: str, max_attempts: int, retry_after_seconds: float
) -> str:
    """Give a claimed record back after a failure: pending again (retried later), or failed for good."""
    final = record.attempts >= max_attempts
    values: dict[str, Any] = {"claim_token": None, "error": error[:2000]}
    if final:
        values.update(status=FAILED, lease_until=None)
    else:
        values.update(lease_until=utcnow() + timedelta(seconds=retry_after_seconds))
    session.execute(update(Record).where(Record.id == record.record_id, Record.claim_token == token).values(**values))
    return FAILED if final else PENDING
