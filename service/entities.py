"""Entities as the API shows them: listing a dataset's entities, one entity with its links, a record's entity.

Grouping, database sync and the follower thread are the engine's (``matching.grouping``,
``matching.entity_sync``, ``matching.entity_follower``); this module reads what they stored and starts the
follower for a service.
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from llmatch.models import Calibration, Dataset, Entity, EntityMember, Record
from matching.entity_sync import links_among, update_entities
from matching.grouping import Grouping
from service.errors import Conflict, NotFound
from service.schemas import EntitiesOut, EntityLinkOut, EntityOut, EntityRecord, EntitySummary


def _require_calibrated(session: Session, dataset: Dataset) -> None:
    if session.scalar(select(Calibration.id).where(Calibration.dataset_id == dataset.id)) is None:
        raise Conflict(
            f"Dataset {dataset.name!r} is not calibrated, and entities are formed from calibrated matches; "
            f"calibrate it first (POST /datasets/{dataset.name}/calibrate)."
        )


def list_entities(session: Session, dataset: Dataset, min_size: int, limit: int, offset: int) -> EntitiesOut:
    """Entities of at least ``min_size`` records, largest first (then oldest)."""
    _require_calibrated(session, dataset)
    where = (Entity.dataset_id == dataset.id, Entity.size >= min_size)
    total = session.scalar(select(func.count()).select_from(Entity).where(*where)) or 0
    page = list(
        session.scalars(
            select(Entity).where(*where).order_by(Entity.size.desc(), Entity.id).limit(limit).offset(offset)
        )
    )
    members = _members(session, [entity.id for entity in page])
    return EntitiesOut(
        entities=[EntitySummary(id=str(e.id), size=e.size, records=members.get(e.id, [])) for e in page],
        total=int(total),
    )


def get_entity(session: Session, dataset: Dataset, entity_id: str) -> EntityOut:
    """One entity with its records and the accepted pairs that link them."""
    _require_calibrated(session, dataset)
    # Entity ids are ASCII decimal text (int() would also read "١" as 1) within a BIGINT.
    known = entity_id.isascii() and entity_id.isdigit() and len(entity_id) < 19
    entity = session.get(Entity, int(entity_id)) if known else None
    if entity is None or entity.dataset_id != dataset.id:
        raise NotFound(
            f"No entity {entity_id!r} in dataset {dataset.name!r}; GET /datasets/{dataset.name}/entities lists them."
        )
    rows = session.execute(
        select(Record.id, Record.source, Record.external_id)
        .join(EntityMember, EntityMember.record_id == Record.id)
        .where(EntityMember.entity_id == entity.id)
        .order_by(Record.source, Record.external_id)
    ).all()
    names = {record_id: EntityRecord(source=source, id=external) for record_id, source, external in rows}
    links = [
        EntityLinkOut(left=names[a], right=names[b], score=score)
        for a, b, score in sorted(links_among(session, list(names)), key=lambda link: -link[2])
    ]
    return EntityOut(id=str(entity.id), size=entity.size, records=list(names.values()), links=links)


def entity_of(session: Session, record_id: int) -> str | None:
    entity_id = session.scalar(select(EntityMember.entity_id).where(EntityMember.record_id == record_id))
    return None if entity_id is None else str(entity_id)


def _members(session: Session, entity_ids: list[int]) -> dict[int, list[EntityRecord]]:
    found: dict[int, list[EntityRecord]] = defaultdict(list)
    for start in range(0, len(entity_ids), 500):
        rows = session.execute(
            select(EntityMember.entity_id, Record.source, Record.external_id)
            .join(Record, Record.id == EntityMember.record_id)
            .where(EntityMember.entity_id.in_(entity_ids[start : start + 500]))
            .order_by(Record.source, Record.external_id)
        )
        for entity_id, source, external in rows:
            found[entity_id].append(EntityRecord(source=source, id=external))
    return found


def refresh(state, dataset_id: int) -> None:  # noqa: ANN001 - service.state.ServiceState
    """Regroup a dataset's entities now if its calibration changed (the calibrate route calls this)."""
    update_entities(state.session_factory, state.registry, dataset_id, Grouping.from_settings(state.settings), [])
