"""Keeps this process's FAISS indexes equal to the database: loads or rebuilds them at start-up, then
follows the ``index_changes`` log so that vectors stored by any worker become searchable within a poll."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from itertools import chain

import numpy as np
from sqlalchemy import Row, Select, and_, delete, insert, select
from sqlalchemy.orm import Session, sessionmaker

from llmatch.db import transaction
from llmatch.models import ENCODED, Calibration, Dataset, Embedding, IndexChange, Record
from llmatch.requeue import requeue
from matching.change_cursor import ChangeCursor, consistent_snapshot, cursor_for, prune
from matching.index import VectorIndex
from matching.index_files import fingerprint
from matching.registry import IndexKey, IndexRegistry

log = logging.getLogger("llmatch.index")

# The log is pruned after this long; a process that had not read that far reloads (see change_cursor.py).
RETENTION = timedelta(hours=1)


class IndexSynchronizer:
    def __init__(self, session_factory: sessionmaker[Session], registry: IndexRegistry):
        self.session_factory = session_factory
        self.registry = registry
        self.cursor: ChangeCursor | None = None  # set by load_all
        self._poll_lock = threading.Lock()
        self._options_lock = threading.Lock()  # index options are read and applied in the order they were read
        self.reloads = 0  # times the log had lost entries this process had not read, and indexes were reloaded
        self.stop_event = threading.Event()
        self.rebuilt: list[IndexKey] = []
        self.loaded_from_file: list[IndexKey] = []
        # Called after each applied batch with (entered, left): record ids per index (e.g. to update entities).
        self.listeners: list[Callable[[dict[IndexKey, list[int]], dict[IndexKey, list[int]]], None]] = []
        # time.monotonic() of the last load or poll that completed; /readyz reports the lag since then.
        self.last_success: float | None = None

    def load_all(self) -> None:
        """Load every index from its file when it matches the database, else rebuild it from stored vectors."""
        started = time.perf_counter()
        with self.session_factory() as session:
            consistent_snapshot(session)  # the cursor's position and the records read below: one moment
            self.cursor = cursor_for(session)
            self.cursor.start(session)
            serving = _serving_encoders(session)
            self._follow_datasets(session, drop_deleted=False)  # each dataset's policy before its indexes load
            for key, (record_ids, embedding_ids) in _encoded_pairs(session).items():
                expected = fingerprint(record_ids, embedding_ids)
                registry = self.registry
                index = VectorIndex.load(registry.path(key), expected, registry.use_gpu, registry.policy_for(key))
                if index is None:
                    index = _rebuild(session, key, registry, len(record_ids))
                    registry.put(key, index)
                    registry.save(key)
                    self.rebuilt.append(key)
                else:
                    registry.put(key, index, saved=index.version == 0)  # restructured on load: save it anew
                    self.loaded_from_file.append(key)
            self.registry.serving_encoders = serving
        self.registry.loaded = True
        self.last_success = time.monotonic()
        log.info(
            "indexes ready in %.2fs: %d loaded from file, %d rebuilt from stored vectors",
            time.perf_counter() - started,
            len(self.loaded_from_file),
            len(self.rebuilt),
        )

    def poll(self) -> int:
        """Apply the changes committed since the last poll; returns how many were applied."""
        with self._poll_lock:  # one reader of the log at a time: the cursor moves only after its batch is applied
            return self._poll()

    def _poll(self) -> int:
        if self.cursor is None:
            self.load_all()
        with self.session_factory() as session:
            if self.cursor.lost_entries(session):
                session.close()
                return self._reload()
            # Read before the changes: a switch committed in between is in the changes but not here, so the
            # registry never names a version whose vectors it has not applied (it may lag: requests catch up).
            serving = _serving_encoders(session)
            fresh = self.cursor.read(session)
            vectors = _vectors_by_embedding(session, {c.embedding_id for c in fresh if c.embedding_id})
            self._apply(fresh, vectors)
            self.registry.serving_encoders = serving
            self._follow_datasets(session)
        self.cursor.advance()
        return len(fresh)

    def _reload(self) -> int:
        """The log was pruned past what this process had read: reload every index from the records."""
        log.warning("the index change log was pruned past this process's position; reloading the indexes")
        self.reloads += 1
        self.load_all()
        return 0

    def prune(self) -> int:
        """Delete log entries older than the retention period."""
        with transaction(self.session_factory) as session:
            return prune(session, RETENTION)

    def run(self, interval: float) -> None:
        """Poll until ``stop_event`` is set; prunes the log about once a minute."""
        last_prune = 0.0
        while not self.stop_event.wait(interval):
            try:
                self.poll()
                self.last_success = time.monotonic()
                if time.monotonic() - last_prune > 60:
                    self.prune()
                    last_prune = time.monotonic()
            except Exception:  # noqa: BLE001 - keep following the log after a transient database error
                log.exception("index sync failed; retrying")

    def _apply(self, changes: list[Row], vectors: dict[int, np.ndarray]) -> None:
        """Apply each record's last change (log order is commit order per record), batched per index."""
        final: dict[int, Row] = {change.record_id: change for change in changes}
        removals: dict[IndexKey, list[int]] = defaultdict(list)
        upserts: dict[IndexKey, list[Row]] = defaultdict(list)
        for change in final.values():
            key = (change.dataset_id, change.source)
            if change.embedding_id in vectors:
                upserts[key].append(change)
            else:
                removals[key].append(change.record_id)
        for key, record_ids in removals.items():
            self.registry.remove(key, record_ids)
        for key, batch in upserts.items():
            self.registry.upsert(
                key,
                np.array([c.record_id for c in batch]),
                np.array([c.embedding_id for c in batch]),
                np.stack([vectors[c.embedding_id] for c in batch]),
            )
        entered = {key: [c.record_id for c in batch] for key, batch in upserts.items()}
        for listener in self.listeners:
            listener(entered, dict(removals))

    def follow_index_options(self) -> None:
        """Switch the indexes of every dataset to its stored index options now (polls do it too)."""
        with self.session_factory() as session:
            self._follow_datasets(session, drop_deleted=False)

    def _follow_datasets(self, session: Session, drop_deleted: bool = True) -> None:
        """One query over the datasets: apply each one's index options (``Dataset.index_options`` over the
        process's policy; a changed policy rebuilds its loaded indexes) and drop the indexes of deleted ones."""
        registry = self.registry
        with self._options_lock:
            rows = session.execute(select(Dataset.id, Dataset.index_options)).all()
            for dataset_id, options in rows:
                registry.set_policy(dataset_id, registry.policy.with_options(options))
            existing = {dataset_id for dataset_id, _ in rows}
            registry.forget_policies(keep=existing)
        if drop_deleted:
            for dataset_id in {key[0] for key in registry.keys()} - existing:
                registry.drop_dataset(dataset_id)


def _serving_encoders(session: Session) -> dict[int, str]:
    """Dataset id -> the encoder its records are embedded with (``Dataset.serving_encoder``)."""
    return {dataset_id: name for dataset_id, name in session.execute(select(Dataset.id, Dataset.serving_encoder))}


# Rows read per round trip when loading ids and vectors at start-up.
PAGE = 20_000


def _encoded_pairs(session: Session) -> dict[IndexKey, tuple[np.ndarray, np.ndarray]]:
    """(record ids, embedding ids) of every encoded record per index, sorted by record id, read in pages."""
    keys = session.execute(select(Record.dataset_id, Record.source).where(Record.status == ENCODED).distinct()).all()
    pairs: dict[IndexKey, tuple[np.ndarray, np.ndarray]] = {}
    for dataset_id, source in keys:
        query = select(Record.id, Record.embedding_id).where(
            Record.dataset_id == dataset_id, Record.source == source, Record.status == ENCODED
        )
        pages = [_int_pairs(page) for page in _pages(session, query)]
        both = np.concatenate(pages) if pages else np.empty((0, 2), dtype=np.int64)
        both = both[np.argsort(both[:, 0], kind="stable")]
        pairs[(dataset_id, source)] = (both[:, 0].copy(), both[:, 1].copy())
    return pairs


def _pages(session: Session, query: Select) -> Iterator[list[tuple]]:
    """The rows of ``query`` in pages of plain tuples from the driver's cursor: start-up reads millions of rows,
    and ORM rows cost several times the read itself (a server-side cursor on PostgreSQL)."""
    connection = session.connection()
    compiled = query.compile(dialect=connection.dialect)
    params = compiled.params
    if compiled.positional:
        params = tuple(params[name] for name in compiled.positiontup or ())
    raw = connection.connection  # the DBAPI connection, inside the session's transaction
    postgres = connection.dialect.name == "postgresql"
    cursor = raw.cursor(name=f"llmatch_pages_{uuid.uuid4().hex}") if postgres else raw.cursor()
    try:
        cursor.execute(str(compiled), params)
        while rows := cursor.fetchmany(PAGE):
            yield rows
    finally:
        cursor.close()


def _int_pairs(rows: Sequence[Sequence[int]]) -> np.ndarray:
    return np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=2 * len(rows)).reshape(-1, 2)


def _rebuild(session: Session, key: IndexKey, registry: IndexRegistry, expected: int = 0) -> VectorIndex:
    """A new index from the stored vectors of one (dataset, source)."""
    record_ids, embedding_ids, vectors = stored_vectors(session, key, expected)
    policy = registry.policy_for(key)
    return VectorIndex.build(record_ids, embedding_ids, vectors, registry.use_gpu, policy)


def stored_vectors(session: Session, key: IndexKey, expected: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(record ids, embedding ids, vectors) of one (dataset, source)'s encoded records, read in pages into one
    array; vectors of another dimension than the first one read are left out."""
    dataset_id, source = key
    query = (
        select(Record.id, Embedding.id, Embedding.dim, Embedding.vector)
        .join(Embedding, Record.embedding_id == Embedding.id)
        .where(Record.dataset_id == dataset_id, Record.source == source, Record.status == ENCODED)
    )
    ids = vectors = None
    count = 0
    for page in _pages(session, query):
        if vectors is None:
            vectors = np.empty((max(expected, len(page)), page[0][2]), dtype=np.float32)
            ids = np.empty((len(vectors), 2), dtype=np.int64)
        dim = vectors.shape[1]
        page = [row for row in page if row[2] == dim]  # a vector of another encoder cannot join this index
        if count + len(page) > len(vectors):
            grown = max(2 * len(vectors), count + len(page))
            vectors = np.resize(vectors, (grown, dim))
            ids = np.resize(ids, (grown, 2))
        ids[count : count + len(page)] = _int_pairs([row[:2] for row in page])
        vectors[count : count + len(page)] = np.frombuffer(b"".join(row[3] for row in page), dtype="<f4").reshape(
            -1, dim
        )
        count += len(page)
    assert vectors is not None and ids is not None, "rebuild called for an index without encoded records"
    return ids[:count, 0], ids[:count, 1], vectors[:count]


def _vectors_by_embedding(session: Session, embedding_ids: set[int]) -> dict[int, np.ndarray]:
    ids = sorted(embedding_ids)
    found: dict[int, np.ndarray] = {}
    for start in range(0, len(ids), 500):
        rows = session.execute(
            select(Embedding.id, Embedding.vector, Embedding.dim).where(Embedding.id.in_(ids[start : start + 500]))
        )
        found.update({i: np.frombuffer(blob, dtype="<f4").astype(np.float32) for i, blob, _dim in rows})
    return found


def follow_encoder_keys(session_factory: sessionmaker[Session], key_of: Callable[[str], str | None]) -> None:
    """Hold each dataset to the encoder configuration its encoder name maps to now (``key_of``: its key, None when
    unknown): records whose vector another configuration made go back to the queue, and a calibration fitted under
    another is dropped (the dataset is uncalibrated until calibrated again); each is logged."""
    with session_factory() as session:
        datasets = session.execute(select(Dataset.id, Dataset.name, Dataset.serving_encoder)).all()
    for dataset_id, name, encoder in datasets:
        key = key_of(encoder)
        if key is None:
            continue
        with transaction(session_factory) as session:
            _requeue_foreign_vectors(session, dataset_id, name, key)
            _drop_foreign_calibration(session, dataset_id, name, key)


def _requeue_foreign_vectors(session: Session, dataset_id: int, name: str, key: str) -> None:
    foreign = and_(
        Record.dataset_id == dataset_id,
        Record.status == ENCODED,
        Record.embedding_id.in_(select(Embedding.id).where(Embedding.encoder_key != key)),
    )
    rows = session.execute(select(Record.id, Record.source).where(foreign)).all()
    for start in range(0, len(rows), 500):
        chunk = rows[start : start + 500]
        requeue(session, Record.id.in_([record_id for record_id, _ in chunk]))
        session.execute(
            insert(IndexChange),
            [{"dataset_id": dataset_id, "source": s, "record_id": r, "embedding_id": None} for r, s in chunk],
        )
    if rows:
        log.warning(
            "dataset %r: %d records had vectors of another encoder configuration than %r (key %s) maps to now; "
            "re-queued for encoding",
            name,
            len(rows),
            name,
            key,
        )


def _drop_foreign_calibration(session: Session, dataset_id: int, name: str, key: str) -> None:
    stale = and_(Calibration.dataset_id == dataset_id, Calibration.encoder_key != key)
    fitted_under = session.scalar(select(Calibration.encoder_key).where(stale))
    if fitted_under is None:
        return
    session.execute(delete(Calibration).where(stale))
    log.warning(
        "dataset %r: its calibration was fitted under encoder configuration %s, not %s that its encoder maps to "
        "now; dropped (calibrate the dataset again)",
        name,
        fitted_under,
        key,
    )
