"""Entities: a calibrated dataset's encoded records grouped through accepted matches among their candidates.

A link is a pair where one record is among the other's ``k`` candidates with a score at or above the
threshold. Plain connected components over links chain unrelated records together (a ~ b ~ c with a and c
unlike), so a merge must pass a guard: ``support`` asks that a share of the pairs across the two groups
score at or above the threshold, ``centroid`` that the groups' mean vectors do, ``none`` is plain components;
``max_size`` caps any of them. Links are merged best first.

Updates are incremental: a record that arrives joins (or bridges) the entities of its links, one that leaves
or changes is taken out and only its entity is regrouped; a new calibration regroups the dataset. Every update
runs under the dataset's ``entity_states`` row lock and compares records with what was grouped, so several
API processes can apply the same change: the first does the work, the others find nothing to do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from llmatch.db import transaction
from llmatch.models import ENCODED, Calibration, Dataset, Entity, EntityLink, EntityMember, EntityState, Record
from llmatch.settings import Settings
from matching.index import IndexRegistry
from matching.pairs import EncodedRecords, candidate_pairs, load_encoded, target_sources
from service.datasets import sources as dataset_sources
from service.errors import Conflict, NotFound
from service.schemas import EntitiesOut, EntityLinkOut, EntityOut, EntityRecord, EntitySummary

log = logging.getLogger("llmatch.entities")

GuardKind = Literal["none", "support", "centroid"]


@dataclass(frozen=True)
class Guard:
    """What two groups of records must show to become one entity."""

    kind: GuardKind = "support"
    min_support: float = 0.5
    max_size: int = 3  # 0: no cap

    @classmethod
    def from_settings(cls, settings: Settings) -> Guard:
        return cls(settings.entity_guard, settings.entity_min_support, settings.entity_max_size)

    def allows(self, left: np.ndarray, right: np.ndarray, threshold: float) -> bool:
        """May groups with these member vectors (rows) merge?"""
        if self.max_size and len(left) + len(right) > self.max_size:
            return False
        if self.kind == "support":
            return float(np.mean(left @ right.T >= threshold)) >= self.min_support
        if self.kind == "centroid":
            a, b = left.mean(axis=0), right.mean(axis=0)
            return float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12) >= threshold
        return True


def group(
    vectors: np.ndarray, links: Iterable[tuple[float, int, int]], threshold: float, guard: Guard
) -> list[list[int]]:
    """Rows grouped by guarded single linkage: links at or above the threshold, best first, merge two groups
    when the guard allows. Every row is in exactly one group."""
    root = list(range(len(vectors)))
    members: dict[int, list[int]] = {i: [i] for i in range(len(vectors))}

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for score, i, j in sorted(links, key=lambda link: (-link[0], link[1], link[2])):
        a, b = find(i), find(j)
        if score < threshold or a == b:
            continue
        if guard.allows(vectors[members[a]], vectors[members[b]], threshold):
            keep, gone = min(a, b), max(a, b)
            root[gone] = keep
            members[keep] += members.pop(gone)
    return list(members.values())


# ----------------------------------------------------------------------------------------------- updates


@dataclass(frozen=True)
class Grouping:
    """How a dataset's entities are formed."""

    guard: Guard
    k: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Grouping:
        return cls(Guard.from_settings(settings), settings.entity_candidates)


@dataclass(frozen=True)
class Regrouping:
    """A whole-dataset grouping computed outside any write transaction, for the calibration it was made with."""

    calibration_id: int
    records: EncodedRecords
    groups: list[list[int]]  # rows of ``records``, largest group first
    links: list[tuple[float, int, int]]  # (score, row, row) at or above the threshold


def plan_regroup(session: Session, dataset_id: int, grouping: Grouping) -> Regrouping | None:
    """The regrouping a new calibration calls for (None when the entities already follow the calibration). Reads
    only: run it in a session that writes nothing, so other writers go on while the dataset is grouped."""
    calibration = session.execute(
        select(Calibration.id, Calibration.threshold).where(Calibration.dataset_id == dataset_id)
    ).first()
    grouped = session.scalar(select(EntityState.calibration_id).where(EntityState.dataset_id == dataset_id))
    if calibration is None or grouped == calibration.id:
        return None
    records, groups, links = _grouping_of(session, dataset_id, calibration.threshold, grouping)
    return Regrouping(calibration.id, records, groups, links)


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
            plan = plan_regroup(session, dataset_id, grouping)
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
            regroup_all(session, dataset_id, calibration.threshold, grouping)
        else:
            _store_grouping(session, dataset_id, plan.records, plan.groups, plan.links)
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
    links = [(score, row[a], row[b]) for a, b, score in _links_among(session, member_ids) if a in row and b in row]
    pieces = sorted(group(records.vectors, links, threshold, guard), key=lambda p: (-len(p), min(p)))
    entity.size = len(pieces[0])
    for piece in pieces[1:]:
        _new_entity(session, dataset_id, [int(records.ids[r]) for r in piece])


def _links_among(session: Session, record_ids: list[int]) -> list[tuple[int, int, float]]:
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
    records = load_encoded(session, dataset_id, record_ids)
    known = dataset_sources(session, dataset_id)
    for row, record_id in enumerate(records.ids):
        record_id = int(record_id)
        vector = records.vectors[row]
        neighbours = _search(registry, dataset_id, known, records.sources[row], record_id, vector, grouping.k)
        neighbours = {r: s for r, s in neighbours.items() if s >= threshold}
        _store_links(session, dataset_id, record_id, _encoded(session, dataset_id, neighbours))
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


def _search(
    registry: IndexRegistry,
    dataset_id: int,
    known: list[str],
    source: str,
    record_id: int,
    vector: np.ndarray,
    k: int,
) -> dict[int, float]:
    """The record's ``k`` nearest records in each of its target sources (this process's indexes)."""
    found: dict[int, float] = {}
    for target in target_sources(known, source):
        for hit in registry.search((dataset_id, target), vector, k + (1 if target == source else 0)):
            if hit.record_id != record_id:
                found[hit.record_id] = min(hit.score, 1.0)
    return found


def _encoded(session: Session, dataset_id: int, scores: dict[int, float]) -> dict[int, float]:
    """Those of these records that are still encoded in the dataset (an index may lag behind a deletion)."""
    if not scores:
        return {}
    alive = set(
        session.scalars(
            select(Record.id).where(
                Record.dataset_id == dataset_id, Record.status == ENCODED, Record.id.in_(list(scores))
            )
        )
    )
    return {r: s for r, s in scores.items() if r in alive}


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


def regroup_all(session: Session, dataset_id: int, threshold: float, grouping: Grouping) -> None:
    """Group every encoded record again (after a new calibration); entities keep their ids where they can."""
    _store_grouping(session, dataset_id, *_grouping_of(session, dataset_id, threshold, grouping))


def _grouping_of(
    session: Session, dataset_id: int, threshold: float, grouping: Grouping
) -> tuple[EncodedRecords, list[list[int]], list[tuple[float, int, int]]]:
    """Every encoded record, its groups (largest first) and the links at or above the threshold (reads only)."""
    records = load_encoded(session, dataset_id)
    pairs = candidate_pairs(records, grouping.k) if len(records) else {}
    links = [(score, i, j) for (i, j), score in pairs.items() if score >= threshold]
    groups = sorted(group(records.vectors, links, threshold, grouping.guard), key=lambda g: (-len(g), min(g)))
    return records, groups, links


def _store_grouping(
    session: Session,
    dataset_id: int,
    records: EncodedRecords,
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
    assigned = _assign_ids(records, groups, previous)
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
                "record_id": int(records.ids[r]),
                "dataset_id": dataset_id,
                "entity_id": entity_id,
                "embedding_id": int(records.embedding_ids[r]),
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
                    "left_record_id": int(min(records.ids[i], records.ids[j])),
                    "right_record_id": int(max(records.ids[i], records.ids[j])),
                    "score": score,
                }
                for score, i, j in links
            ],
        )


def _assign_ids(records: EncodedRecords, groups: list[list[int]], previous: dict[int, int]) -> list[int | None]:
    """For each group (largest first), the oldest previous entity id among its members not taken yet."""
    used: set[int] = set()
    assigned: list[int | None] = []
    for rows in groups:
        olds = sorted({previous[int(records.ids[r])] for r in rows if int(records.ids[r]) in previous} - used)
        assigned.append(olds[0] if olds else None)
        if olds:
            used.add(olds[0])
    return assigned


# ----------------------------------------------------------------------------------------------- reading


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
        for a, b, score in sorted(_links_among(session, list(names)), key=lambda link: -link[2])
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


# ----------------------------------------------------------------------------------------------- following


class EntityFollower:
    """Applies what entered or left the indexes to entities, in its own thread (outside the follower's read)."""

    def __init__(self, session_factory: sessionmaker[Session], registry: IndexRegistry, grouping: Grouping):
        self.session_factory = session_factory
        self.registry = registry
        self.grouping = grouping
        self.pending: dict[int, set[int]] = defaultdict(set)
        self.reconcile_due = True  # at start-up: whatever changed while no process was following
        self.wake = threading.Event()
        self._pending_lock = threading.Lock()
        self._work_lock = threading.Lock()

    def on_index_changes(self, entered: dict[tuple[int, str], list[int]], left: dict[tuple[int, str], list[int]]):
        """Index follower listener: note the records, the thread does the work."""
        with self._pending_lock:
            for changes in (entered, left):
                for (dataset_id, _source), record_ids in changes.items():
                    self.pending[dataset_id].update(int(r) for r in record_ids)
        if entered or left:
            self.wake.set()

    def refresh(self, dataset_id: int) -> None:
        """Bring one dataset up to date now (after its calibration changed)."""
        with self._work_lock:
            update_entities(self.session_factory, self.registry, dataset_id, self.grouping, [])

    def run_once(self) -> None:
        """Apply the noted changes (and, when due, compare every dataset's records with its entities)."""
        with self._work_lock:
            with self._pending_lock:
                pending, self.pending = self.pending, defaultdict(set)
                reconcile, self.reconcile_due = self.reconcile_due, False
            try:
                if reconcile:
                    with self.session_factory() as session:
                        dataset_ids = list(session.scalars(select(Dataset.id)))
                    for dataset_id in dataset_ids:
                        update_entities(self.session_factory, self.registry, dataset_id, self.grouping, None)
                for dataset_id, record_ids in pending.items():
                    update_entities(self.session_factory, self.registry, dataset_id, self.grouping, record_ids)
            except Exception:
                self.reconcile_due = True  # the comparison of every record repairs whatever was missed
                raise

    def run(self, stop: threading.Event, reconcile_seconds: float = 60.0) -> None:
        last = time.monotonic()
        while not stop.is_set():
            self.wake.wait(timeout=1.0)
            self.wake.clear()
            if time.monotonic() - last > reconcile_seconds:
                self.reconcile_due, last = True, time.monotonic()
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - keep following; the next comparison repairs
                log.exception("entity update failed; retrying")
                stop.wait(1.0)


def refresh(state, dataset_id: int) -> None:  # noqa: ANN001 - service.state.ServiceState
    """Regroup a dataset's entities now if its calibration changed (the calibrate route calls this)."""
    update_entities(state.session_factory, state.registry, dataset_id, Grouping.from_settings(state.settings), [])


def follow(state) -> EntityFollower:  # noqa: ANN001 - service.state.ServiceState (imported lazily: no cycle)
    """Attach an entity follower to a started service: a listener on its index follower and a thread."""
    follower = EntityFollower(state.session_factory, state.registry, Grouping.from_settings(state.settings))
    state.synchronizer.listeners.append(follower.on_index_changes)
    thread = threading.Thread(target=follower.run, args=(state.synchronizer.stop_event,), name="entities", daemon=True)
    thread.start()
    state.threads.append(thread)
    return follower
