"""The entity follower: applies what entered or left the indexes to entities, in a thread of its own."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from llmatch.models import Dataset
from matching.entity_sync import update_entities
from matching.grouping import Grouping
from matching.registry import IndexRegistry

log = logging.getLogger("llmatch.entities")


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
