"""Record ingestion (idempotent by (dataset, source, id) and content), lookup and deletion."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from encoding.recipe import Recipe, record_input
from encoding.render import content_hash
from llmatch.models import PENDING, Dataset, IndexChange, Record
from llmatch.requeue import delete_orphans, requeue
from service.datasets import get_dataset
from service.errors import NotFound, without_paths
from service.limits import check_attribute_names, check_source_count
from service.schemas import IngestResult, RecordIn, RecordOut


def ingest(
    session: Session,
    dataset_name: str,
    source: str,
    records: Sequence[RecordIn],
    max_attributes: int | None = None,
    max_sources: int | None = None,
) -> IngestResult:
    """Store a batch durably in the caller's transaction. New or changed records are queued for encoding.
    With ``max_attributes``, a batch that would bring the dataset past that many attribute names gets 422;
    with ``max_sources``, likewise for sources."""
    dataset = get_dataset(session, dataset_name, lock=True)  # serialises ingestion per dataset
    if max_sources is not None:
        check_source_count(session, dataset, source, max_sources)
    if max_attributes is not None:
        check_attribute_names(dataset, (r.attributes for r in records), max_attributes)
    incoming = {r.id: (r.attributes, content_hash(r.attributes)) for r in records}
    existing = _existing(session, dataset.id, source, list(incoming))
    created = [
        {
            "dataset_id": dataset.id,
            "source": source,
            "external_id": rid,
            "attributes": attributes,
            "content_hash": digest,
            "status": PENDING,
            "attempts": 0,
        }
        for rid, (attributes, digest) in incoming.items()
        if rid not in existing
    ]
    changed = [
        (existing[rid], attributes, digest)
        for rid, (attributes, digest) in incoming.items()
        if rid in existing and existing[rid].content_hash != digest
    ]
    if created:
        session.execute(insert(Record), created)
    if changed:
        _replace(session, dataset, source, changed)
    _note_attributes(dataset, (r.attributes for r in records))
    return IngestResult(
        accepted=len(records),
        created=len(created),
        updated=len(changed),
        unchanged=len(records) - len(created) - len(changed),
    )


def _existing(session: Session, dataset_id: int, source: str, ids: list[str]) -> dict[str, Record]:
    found: dict[str, Record] = {}
    for start in range(0, len(ids), 1000):
        rows = session.scalars(
            select(Record).where(
                Record.dataset_id == dataset_id,
                Record.source == source,
                Record.external_id.in_(ids[start : start + 1000]),
            )
        )
        found.update({record.external_id: record for record in rows})
    return found


def _replace(session: Session, dataset: Dataset, source: str, changed: list[tuple[Record, dict, str]]) -> None:
    """New content replaces the old version: back to the queue, out of the index."""
    session.execute(
        update(Record),
        [{"id": record.id, "attributes": attributes, "content_hash": digest} for record, attributes, digest in changed],
    )
    ids = [record.id for record, _, _ in changed]
    for start in range(0, len(ids), 1000):
        requeue(session, Record.id.in_(ids[start : start + 1000]))
    # Logged after the update, whatever the status read above: a worker may have encoded the old version
    # since, and the log must end with the removal.
    session.execute(
        insert(IndexChange),
        [
            {"dataset_id": dataset.id, "source": source, "record_id": record.id, "embedding_id": None}
            for record, _, _ in changed
        ],
    )


def _note_attributes(dataset: Dataset, attribute_maps) -> None:
    """Remember attribute names in the order first seen (the default serialization order)."""
    seen = list(dataset.seen_attributes or [])
    known = set(seen)
    for attributes in attribute_maps:
        for name in attributes:
            if name not in known:
                seen.append(name)
                known.add(name)
    if len(seen) != len(dataset.seen_attributes or []):
        dataset.seen_attributes = seen


def get_record(session: Session, dataset: Dataset, source: str, record_id: str) -> Record:
    record = session.scalar(
        select(Record).where(Record.dataset_id == dataset.id, Record.source == source, Record.external_id == record_id)
    )
    if record is None:
        raise unknown_record(dataset, source, record_id)
    return record


def unknown_record(dataset: Dataset, source: str, record_id: str) -> NotFound:
    return NotFound(f"No record {record_id!r} in source {source!r} of dataset {dataset.name!r}.")


def record_out(dataset: Dataset, record: Record) -> RecordOut:
    made = record_input(record.attributes, Recipe.of_dataset(dataset))  # uncut: the whole text
    return RecordOut(
        dataset=dataset.name,
        source=record.source,
        id=record.external_id,
        attributes=record.attributes,
        text=made.text,
        instruction=made.instruction,
        status=record.status,
        error=None if record.error is None else without_paths(record.error),
        encoded_at=record.encoded_at,
    )


def delete_record(session: Session, dataset_name: str, source: str, record_id: str) -> Record:
    """Delete a record and its vector (unless another record shares it); logs its removal from the index."""
    dataset = get_dataset(session, dataset_name)
    record = get_record(session, dataset, source, record_id)
    embedding_id = record.embedding_id
    session.delete(record)
    session.add(IndexChange(dataset_id=dataset.id, source=source, record_id=record.id, embedding_id=None))
    session.flush()
    delete_orphans(session, [embedding_id] if embedding_id else [])
    return record
