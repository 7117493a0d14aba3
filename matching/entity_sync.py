"""Entities in the database: a calibrated dataset's encoded records grouped (``matching.grouping``) through
accepted matches among their neighbours (``matching.neighbours``), stored as entities, members and links.

Updates are incremental: a record that arrives joins (or bridges) the entities of its links, one that leaves
or changes is taken out and only its entity is regrouped; a new calibration regroups the dataset. Every update
runs under the dataset's ``entity_states`` row lock and compares records with what was grouped, so several
API processes can apply the same change: the first does the work, the others find nothing to do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from llmatch.db import transaction
from llmatch.models import ENCODED, Calibration, Dataset, Entity, EntityLink, EntityMember, EntityState, Record
from matching.errors import IndexesNotLoaded
from matching.grouping import Grouping, Guard, group
from matching.neighbours import Neighbour, dataset_sources, neighbours
from matching.pairs import EncodedRecords, encoded_ids, load_encoded
from matching.registry import IndexRegistry

log = logging.getLogger("llmatch.entities")

CHUNK = 1000  # records whose vectors are read (and searched) at a time


@dataclass(frozen=True)
class Regrouping:
    """A whole-dataset grouping computed outside any write transaction, for the calibration it was made with."""

    calibration_id: int
    record_ids: np.ndarray  # the records grouped, sorted
    embedding_ids: np.ndarray  # the embedding each was grouped with
    groups: list[list[int]]  # rows of ``record_ids``, largest group first
    links: list[tuple[float, int, int]]  # (score, row, row) at or above the threshold


def plan_regroup(session: Session, registry: IndexRegistry, dataset_id: int, grouping: Grouping) -> Regrouping | None:
    """The regrouping a new calibration calls for (None when the entities already follow the calibration). Reads
    only: run it in a session that writes nothing, so other writers go on while the dataset is grouped."""
    calibration = session.execute(
        select(Calibration.id, Calibration.threshold).where(Calibration.dataset_id == dataset_id)
    ).first()
    grouped = session.scalar(select(EntityState.calibration_id).where(EntityState.dataset_id == dataset_id))
    if calibration is None or grouped == calibration.id:
        return None
    return Regrouping(calibration.id, *_grouping_of(session, registry, dataset_id, calibration.threshold, grouping))


def update_entities(
    session_factory: sessionmaker[Session],
    registry: IndexRegistry,
    dataset_id: int,
    grouping: Grouping,
    record_ids: Iterable[int] | None = None,
    attempts: int = 3,
) -> None:
    """``sync`` with any whole-dataset regrouping computed before the dataset's row lock is taken: the write
    transaction then only stores the groups (and applies what changed meanwhile)."""
    for _ in range(attempts):
        with session_factory() as session:
            plan = plan_regroup(session, registry, dataset_id, grouping)
        with transaction(session_factory) as session:
            if sync(session, registry, dataset_id, grouping, record_ids, plan):
                return
        log.info("dataset %d was calibrated again while its entities were regrouped; regrouping anew", dataset_id)
    with transaction(session_factory) as session:  # the calibration keeps changing: regroup under the lock
        sync(session, registry, dataset_id, grouping, record_ids)


def sync(
    session: Session,
    registry: IndexRegistry,
    dataset_id: int,
    grouping: Grouping,
    record_ids: Iterable[int] | None = None,
    plan: Regrouping | None = None,
) -> bool:
    """Bring a dataset's entities up to date with its records and calibration, under its row lock.

    ``record_ids`` names the records that may have changed (None: compare every record). A new calibration
    regroups the whole dataset (with ``plan`` when it was computed for this calibration, then the records that
    changed since it was read are updated; under the lock when no plan is given); otherwise only records that
    differ from what was grouped are updated. Returns False, having changed nothing, when ``plan`` was computed
    for another calibration than the dataset's now.
    """
    if not _lock_dataset(session, dataset_id):
        return True  # deleted meanwhile: nothing left to group
    state = _lock_state(session, dataset_id)
    calibration = session.scalar(select(Calibration).where(Calibration.dataset_id == dataset_id))
    if calibration is None:
        if state.calibration_id is not None or state.threshold is not None:
            _clear(session, dataset_id)
            state.calibration_id, state.threshold = None, None
        return True
    if state.calibration_id != calibration.id:
        if plan is not None and plan.calibration_id != calibration.id:
            return False
        if plan is None:
            regroup_all(session, registry, dataset_id, calibration.threshold, grouping)
        else:
            _store_grouping(session, dataset_id, plan.record_ids, plan.embedding_ids, plan.groups, plan.links)
            record_ids = None  # compare every record: some may have changed since the plan read them
        state.calibration_id, state.threshold = calibration.id, calibration.threshold
        if plan is None:
            return True
    leaving, arriving = _differences(session, dataset_id, record_ids)
    if leaving:
        _remove(session, dataset_id, leaving, calibration.threshold, grouping.guard)
    if arriving:
        _add(session, registry, dataset_id, arriving, calibration.threshold, grouping)
    return True


def _lock_dataset(session: Session, dataset_id: int) -> bool:
    """Share-lock the dataset's row before any entity row, as DELETE /datasets locks it before deleting: the two
    then wait for each other instead of each holding rows the other needs (a deadlock on PostgreSQL). False when
    the dataset is gone."""
    found = session.scalar(select(Dataset.id).where(Dataset.id == dataset_id).with_for_update(key_share=True))
    return found is not None


def _lock_state(session: Session, dataset_id: int) -> EntityState:
    """The dataset's state row, created if missing and locked for this transaction."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    session.execute(
        dialect.insert(EntityState).values(dataset_id=dataset_id).on_conflict_do_nothing(index_elements=["dataset_id"])
    )
    return session.scalars(
        select(EntityState)
        .where(EntityState.dataset_id == dataset_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()


def _clear(session: Session, dataset_id: int) -> None:
    session.execute(delete(EntityLink).where(EntityLink.dataset_id == dataset_id))
    session.execute(delete(EntityMember).where(EntityMember.dataset_id == dataset_id))
    session.execute(delete(Entity).where(Entity.dataset_id == dataset_id))


def _differences(session: Session, dataset_id: int, record_ids: Iterable[int] | None) -> tuple[list[int], list[int]]:
    """(members to take out, encoded records to add): records gone, no longer encoded, or with a new vector
    leave; records encoded but not grouped with their current vector arrive (a changed record does both)."""
    encoded_query = select(Record.id, Record.embedding_id).where(
        Record.dataset_id == dataset_id, Record.status == ENCODED
    )
    member_query = select(EntityMember.record_id, EntityMember.embedding_id).where(
        EntityMember.dataset_id == dataset_id
    )
    encoded: dict[int, int] = {}
    grouped: dict[int, int] = {}
    if record_ids is None:
        encoded = _pairs_of(session.execute(encoded_query))
        grouped = _pairs_of(session.execute(member_query))
    else:
        wanted = sorted(set(record_ids))
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            encoded.update(_pairs_of(session.execute(encoded_query.where(Record.id.in_(chunk)))))
            grouped.update(_pairs_of(session.execute(member_query.where(EntityMember.record_id.in_(chunk)))))
    leaving = sorted(r for r, e in grouped.items() if encoded.get(r) != e)
    arriving = sorted(r for r, e in encoded.items() if grouped.get(r) != e)
    return leaving, arriving


def _pairs_of(rows: Iterable) -> dict[int, int]:
    """Two-column rows as a dict (first column -> second)."""
    return {first: second for first, second in rows}


def _remove(session: Session, dataset_id: int, record_ids: list[int], threshold: float, guard: Guard) -> None:
    """Take records out of their entities and regroup what is left of each of those entities."""
    affected: set[int] = set()
    for start in range(0, len(record_ids), 500):
        chunk = record_ids[start : start + 500]
        affected.update(session.scalars(select(EntityMember.entity_id).where(EntityMember.record_id.in_(chunk))))
        session.execute(delete(EntityMember).where(EntityMember.record_id.in_(chunk)))
        session.execute(
            delete(EntityLink).where(or_(EntityLink.left_record_id.in_(chunk), EntityLink.right_record_id.in_(chunk)))
        )
    for entity_id in sorted(affected):
        _regroup_entity(session, dataset_id, entity_id, threshold, guard)


def _regroup_entity(session: Session, dataset_id: int, entity_id: int, threshold: float, guard: Guard) -> None:
    """Regroup one entity's members on their stored links: the largest piece keeps the id, others get new ones."""
    entity = session.get(Entity, entity_id)
    member_ids = list(session.scalars(select(EntityMember.record_id).where(EntityMember.entity_id == entity_id)))
    if entity is None:
        return
    if not member_ids:
        session.delete(entity)
        return
    records = load_encoded(session, dataset_id, member_ids)
    row = records.row_of()
    links = [(score, row[a], row[b]) for a, b, score in links_among(session, member_ids) if a in row and b in row]
    pieces = sorted(group(records.vectors, links, threshold, guard), key=lambda p: (-len(p), min(p)))
    entity.size = len(pieces[0])
    for piece in pieces[1:]:
        _new_entity(session, dataset_id, [int(records.ids[r]) for r in piece])


def links_among(session: Session, record_ids: list[int]) -> list[tuple[int, int, float]]:
    wanted = set(record_ids)
    found: list[tuple[int, int, float]] = []
    ordered = sorted(wanted)
    for start in range(0, len(ordered), 500):
        rows = session.execute(
            select(EntityLink.left_record_id, EntityLink.right_record_id, EntityLink.score).where(
                EntityLink.left_record_id.in_(ordered[start : start + 500])
            )
        )
        found += [(a, b, s) for a, b, s in rows if b in wanted]
    return found


def _new_entity(session: Session, dataset_id: int, record_ids: list[int]) -> Entity:
    """A new entity for records that are members of another one (they move to it)."""
    entity = Entity(dataset_id=dataset_id, size=len(record_ids))
    session.add(entity)
    session.flush()
    session.execute(update(EntityMember).where(EntityMember.record_id.in_(record_ids)).values(entity_id=entity.id))
    return entity


def _add(
    session: Session,
    registry: IndexRegistry,
    dataset_id: int,
    record_ids: list[int],
    threshold: float,
    grouping: Grouping,
) -> None:
    """Group arriving records one by one: each joins the entities it links to, oldest and best first, as far as
    the guard allows; one that joins none starts its own."""
    for records, found in _neighbours_by_chunk(session, registry, dataset_id, record_ids, grouping.k):
        for row, hits in enumerate(found):
            _add_one(session, dataset_id, records, row, hits, threshold, grouping)


def _neighbours_by_chunk(
    session: Session, registry: IndexRegistry, dataset_id: int, record_ids: Sequence[int], k: int
) -> Iterator[tuple[EncodedRecords, list[list[Neighbour]]]]:
    """The encoded ones of these records, ``CHUNK`` at a time (vectors read per chunk), each with its neighbours."""
    known = dataset_sources(session, dataset_id)
    for start in range(0, len(record_ids), CHUNK):
        records = load_encoded(session, dataset_id, list(record_ids[start : start + CHUNK]))
        found = neighbours(
            session,
            registry,
            dataset_id,
            records.vectors,
            k,
            record_ids=records.ids.tolist(),
            sources=records.sources,
            known=known,
        )
        yield records, found


def _add_one(
    session: Session,
    dataset_id: int,
    records: EncodedRecords,
    row: int,
    hits: list[Neighbour],
    threshold: float,
    grouping: Grouping,
) -> None:
    """Group one arriving record (row of ``records``) with its neighbours ``hits``."""
    record_id = int(records.ids[row])
    vector = records.vectors[row]
    _store_links(session, dataset_id, record_id, {hit.record_id: hit.score for hit in hits if hit.score >= threshold})
    linked = _stored_links(session, record_id, threshold)
    entities = _entities_by_best_link(session, linked)
    current: Entity | None = None
    group_vectors = vector[None, :]
    for entity_id in entities:
        other = session.get(Entity, entity_id)
        if other is None or (current is not None and other.id == current.id):
            continue
        other_vectors = _member_vectors(session, dataset_id, other.id)
        if not grouping.guard.allows(group_vectors, other_vectors, threshold):
            continue
        current = other if current is None else _merge(session, current, other)
        group_vectors = np.vstack([group_vectors, other_vectors])
    if current is None:
        current = Entity(dataset_id=dataset_id, size=0)
        session.add(current)
        session.flush()
    current.size += 1
    session.add(
        EntityMember(
            record_id=record_id,
            dataset_id=dataset_id,
            entity_id=current.id,
            embedding_id=int(records.embedding_ids[row]),
        )
    )
    session.flush()


def _store_links(session: Session, dataset_id: int, record_id: int, scores: dict[int, float]) -> None:
    if not scores:
        return
    pairs = {(min(record_id, other), max(record_id, other)): score for other, score in scores.items()}
    rows = session.execute(
        select(EntityLink.left_record_id, EntityLink.right_record_id).where(
            or_(EntityLink.left_record_id == record_id, EntityLink.right_record_id == record_id)
        )
    )
    existing = {(left, right) for left, right in rows}
    new = [
        {"dataset_id": dataset_id, "left_record_id": a, "right_record_id": b, "score": s}
        for (a, b), s in pairs.items()
        if (a, b) not in existing
    ]
    if new:
        session.execute(insert(EntityLink), new)


def _stored_links(session: Session, record_id: int, threshold: float) -> dict[int, float]:
    """Every stored link of a record at or above the threshold (its own candidates and those that found it)."""
    rows = session.execute(
        select(EntityLink.left_record_id, EntityLink.right_record_id, EntityLink.score).where(
            or_(EntityLink.left_record_id == record_id, EntityLink.right_record_id == record_id),
            EntityLink.score >= threshold,
        )
    )
    return {(b if a == record_id else a): s for a, b, s in rows}


def _entities_by_best_link(session: Session, linked: dict[int, float]) -> list[int]:
    """The entities of linked records, by their best link (then oldest first)."""
    if not linked:
        return []
    rows = session.execute(
        select(EntityMember.record_id, EntityMember.entity_id).where(EntityMember.record_id.in_(list(linked)))
    )
    best: dict[int, float] = {}
    for record_id, entity_id in rows:
        best[entity_id] = max(best.get(entity_id, -2.0), linked[record_id])
    return sorted(best, key=lambda e: (-best[e], e))


def _member_vectors(session: Session, dataset_id: int, entity_id: int) -> np.ndarray:
    ids = list(session.scalars(select(EntityMember.record_id).where(EntityMember.entity_id == entity_id)))
    return load_encoded(session, dataset_id, ids).vectors


def _merge(session: Session, a: Entity, b: Entity) -> Entity:
    """One entity from two: the older id survives."""
    keep, gone = (a, b) if a.id < b.id else (b, a)
    session.execute(update(EntityMember).where(EntityMember.entity_id == gone.id).values(entity_id=keep.id))
    keep.size += gone.size
    session.delete(gone)
    session.flush()
    return keep


def regroup_all(
    session: Session, registry: IndexRegistry, dataset_id: int, threshold: float, grouping: Grouping
) -> None:
    """Group every encoded record again (after a new calibration); entities keep their ids where they can."""
    _store_grouping(session, dataset_id, *_grouping_of(session, registry, dataset_id, threshold, grouping))


def _grouping_of(
    session: Session, registry: IndexRegistry, dataset_id: int, threshold: float, grouping: Grouping
) -> tuple[np.ndarray, np.ndarray, list[list[int]], list[tuple[float, int, int]]]:
    """Every encoded record (ids, embedding ids), its groups (rows, largest first) and the links at or above the
    threshold (reads only). Neighbours come from the loaded indexes (``neighbours``), the queries' vectors are read
    in chunks, and only the vectors of linked records are held for the guard."""
    if not registry.loaded:
        raise IndexesNotLoaded(f"dataset {dataset_id} cannot be regrouped before this process's indexes are loaded")
    record_ids, embedding_ids = encoded_ids(session, dataset_id)
    row_of = {int(record_id): row for row, record_id in enumerate(record_ids)}
    pairs: dict[tuple[int, int], float] = {}
    for chunk, found in _neighbours_by_chunk(session, registry, dataset_id, record_ids.tolist(), grouping.k):
        for query_id, hits in zip(chunk.ids.tolist(), found, strict=True):
            for hit in hits:
                if hit.record_id in row_of:
                    i, j = sorted((row_of[query_id], row_of[hit.record_id]))
                    pairs[(i, j)] = hit.score
    links = [(score, i, j) for (i, j), score in pairs.items() if score >= threshold]
    linked = load_encoded(session, dataset_id, sorted({int(record_ids[r]) for _, i, j in links for r in (i, j)}))
    sub = {row_of[int(record_id)]: at for at, record_id in enumerate(linked.ids)}  # row -> row of ``linked``
    links = [link for link in links if link[1] in sub and link[2] in sub]  # (a linked record gone meanwhile)
    pieces = group(linked.vectors, [(score, sub[i], sub[j]) for score, i, j in links], threshold, grouping.guard)
    groups = [[int(row_of[int(linked.ids[at])]) for at in piece] for piece in pieces]
    groups += [[row] for row in range(len(record_ids)) if row not in sub]  # unlinked: alone
    groups.sort(key=lambda g: (-len(g), min(g)))
    return record_ids, embedding_ids, groups, links


def _store_grouping(
    session: Session,
    dataset_id: int,
    record_ids: np.ndarray,
    embedding_ids: np.ndarray,
    groups: list[list[int]],
    links: list[tuple[float, int, int]],
) -> None:
    """Replace the dataset's entities, members and links with these groups; entities keep their ids where they can."""
    previous = _pairs_of(
        session.execute(
            select(EntityMember.record_id, EntityMember.entity_id).where(EntityMember.dataset_id == dataset_id)
        )
    )
    session.execute(delete(EntityLink).where(EntityLink.dataset_id == dataset_id))
    session.execute(delete(EntityMember).where(EntityMember.dataset_id == dataset_id))
    assigned = _assign_ids(record_ids, groups, previous)
    kept = {entity_id for entity_id in assigned if entity_id is not None}
    session.execute(delete(Entity).where(Entity.dataset_id == dataset_id, Entity.id.not_in(kept or {-1})))
    fresh = [{"dataset_id": dataset_id, "size": len(g)} for g, e in zip(groups, assigned, strict=True) if e is None]
    new_ids = iter(
        session.scalars(insert(Entity).returning(Entity.id, sort_by_parameter_order=True), fresh).all() if fresh else []
    )
    sizes = [{"id": e, "size": len(g)} for g, e in zip(groups, assigned, strict=True) if e is not None]
    if sizes:
        session.execute(update(Entity), sizes)
    members = []
    for members_rows, old_id in zip(groups, assigned, strict=True):
        entity_id = old_id if old_id is not None else next(new_ids)
        members += [
            {
                "record_id": int(record_ids[r]),
                "dataset_id": dataset_id,
                "entity_id": entity_id,
                "embedding_id": int(embedding_ids[r]),
            }
            for r in members_rows
        ]
    if members:
        session.execute(insert(EntityMember), members)
    if links:
        session.execute(
            insert(EntityLink),
            [
                {
                    "dataset_id": dataset_id,
                    "left_record_id": int(min(record_ids[i], record_ids[j])),
                    "right_record_id": int(max(record_ids[i], record_ids[j])),
                    "score": score,
                }
                for score, i, j in links
            ],
        )


def _assign_ids(record_ids: np.ndarray, groups: list[list[int]], previous: dict[int, int]) -> list[int | None]:
    """For each group (largest first), the oldest previous entity id among its members not taken yet."""
    used: set[int] = set()
    assigned: list[int | None] = []
    for rows in groups:
        olds = sorted({previous[int(record_ids[r])] for r in rows if int(record_ids[r]) in previous} - used)
        assigned.append(olds[0] if olds else None)
        if olds:
            used.add(olds[0])
    return assigned
