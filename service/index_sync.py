"""Keeps this process's FAISS indexes equal to the database: loads or rebuilds them at start-up, then
follows the ``index_changes`` log so that vectors stored by any worker become searchable within a poll."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import Row, delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from llmatch.models import ENCODED, Dataset, Embedding, IndexChange, Record
from llmatch.vectors import stack
from service.index import IndexKey, IndexRegistry, VectorIndex, fingerprint

log = logging.getLogger("llmatch.index")

# Changes are re-read for this long, so a transaction that committed late is still seen.
OVERLAP = timedelta(seconds=30)
# The log is pruned after this long; a process that was away longer rebuilds at start-up.
RETENTION = timedelta(hours=1)


class IndexSynchronizer:
    def __init__(self, session_factory: sessionmaker[Session], registry: IndexRegistry):
        self.session_factory = session_factory
        self.registry = registry
        self.watermark: datetime | None = None
        self._applied: set[int] = set()
        self.stop_event = threading.Event()
        self.rebuilt: list[IndexKey] = []
        self.loaded_from_file: list[IndexKey] = []

    def load_all(self) -> None:
        """Load every index from its file when it matches the database, else rebuild it from stored vectors."""
        started = time.perf_counter()
        with self.session_factory() as session:
            self.watermark = _db_now(session)
            for key, pairs in _encoded_pairs(session).items():
                index = VectorIndex.load(self.registry.path(key), fingerprint(pairs.items()), self.registry.use_gpu)
                if index is None:
                    index = _rebuild(session, key, self.registry.use_gpu)
                    index.save(self.registry.path(key), {"dataset_id": key[0], "source": key[1]})
                    self.rebuilt.append(key)
                else:
                    self.loaded_from_file.append(key)
                self.registry.put(key, index)
        self.registry.loaded = True
        log.info(
            "indexes ready in %.2fs: %d loaded from file, %d rebuilt from stored vectors",
            time.perf_counter() - started,
            len(self.loaded_from_file),
            len(self.rebuilt),
        )

    def poll(self) -> int:
        """Apply the changes logged since the last poll; returns how many were applied."""
        with self.session_factory() as session:
            now = _db_now(session)
            since = (self.watermark or now) - OVERLAP
            changes = session.execute(
                select(
                    IndexChange.id,
                    IndexChange.dataset_id,
                    IndexChange.source,
                    IndexChange.record_id,
                    IndexChange.embedding_id,
                )
                .where(IndexChange.created_at >= since)
                .order_by(IndexChange.id)
            ).all()
            fresh = [c for c in changes if c.id not in self._applied]
            vectors = _vectors_by_embedding(session, {c.embedding_id for c in fresh if c.embedding_id})
            self._apply(fresh, vectors)
            self._drop_deleted_datasets(session)
        self._applied = {c.id for c in changes}
        self.watermark = now
        return len(fresh)

    def prune(self) -> int:
        """Delete log entries older than the retention period."""
        with self.session_factory() as session, session.begin():
            cutoff = _db_now(session) - RETENTION
            return session.execute(delete(IndexChange).where(IndexChange.created_at < cutoff)).rowcount or 0

    def run(self, interval: float) -> None:
        """Poll until ``stop_event`` is set; prunes the log about once a minute."""
        last_prune = 0.0
        while not self.stop_event.wait(interval):
            try:
                self.poll()
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

    def _drop_deleted_datasets(self, session: Session) -> None:
        existing = set(session.scalars(select(Dataset.id)))
        for dataset_id in {key[0] for key in self.registry.keys()} - existing:
            self.registry.drop_dataset(dataset_id)


def _db_now(session: Session) -> datetime:
    return session.scalar(select(func.now()))


def _encoded_pairs(session: Session) -> dict[IndexKey, dict[int, int]]:
    """(record id -> embedding id) of every encoded record, per index."""
    pairs: dict[IndexKey, dict[int, int]] = defaultdict(dict)
    rows = session.execute(
        select(Record.dataset_id, Record.source, Record.id, Record.embedding_id).where(Record.status == ENCODED)
    )
    for dataset_id, source, record_id, embedding_id in rows:
        pairs[(dataset_id, source)][record_id] = embedding_id
    return pairs


def _rebuild(session: Session, key: IndexKey, use_gpu: bool) -> VectorIndex:
    """A new index from the stored vectors of one (dataset, source)."""
    dataset_id, source = key
    query = (
        select(Record.id, Embedding.id, Embedding.vector, Embedding.dim)
        .join(Embedding, Record.embedding_id == Embedding.id)
        .where(Record.dataset_id == dataset_id, Record.source == source, Record.status == ENCODED)
        .execution_options(yield_per=10_000)
    )
    index: VectorIndex | None = None
    for chunk in session.execute(query).partitions():
        dim = chunk[0][3]
        index = index or VectorIndex(dim, use_gpu)
        index.upsert(
            np.array([r[0] for r in chunk]), np.array([r[1] for r in chunk]), stack([r[2] for r in chunk], dim)
        )
    assert index is not None, "rebuild called for an index without encoded records"
    return index


def _vectors_by_embedding(session: Session, embedding_ids: set[int]) -> dict[int, np.ndarray]:
    ids = sorted(embedding_ids)
    found: dict[int, np.ndarray] = {}
    for start in range(0, len(ids), 500):
        rows = session.execute(
            select(Embedding.id, Embedding.vector, Embedding.dim).where(Embedding.id.in_(ids[start : start + 500]))
        )
        found.update({i: np.frombuffer(blob, dtype="<f4").astype(np.float32) for i, blob, _dim in rows})
    return found
