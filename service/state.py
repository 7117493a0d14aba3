"""What the API process holds, in one place: database, encoder pools, key cache, indexes, metrics collectors, and
every background thread (index follower, index saver, entity follower, the in-process worker). ``service/app.py``
only builds the app around it: ``ServiceState.open`` in its lifespan, then ``start`` and ``close``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from encoder_worker.worker import EncoderWorker
from encoding.registry import EncoderPool, UnknownEncoderError
from learning.runner import JobRunner
from llmatch.db import make_engine, make_session_factory
from llmatch.migrate import ensure_schema
from llmatch.settings import Settings
from matching.entity_follower import EntityFollower
from matching.errors import IndexBehind
from matching.grouping import Grouping
from matching.index_gpu import gpu_available
from matching.index_policy import IndexPolicy
from matching.index_sync import IndexSynchronizer, follow_encoder_keys
from matching.registry import IndexRegistry
from service import metrics
from service.errors import ServiceUnavailable
from service.inline_encoder import inline_encoder_pool
from service.keys import KeyCache
from service.limits import InlineEncodes

log = logging.getLogger("llmatch.api")
T = TypeVar("T")


class SchemaNotReadyError(RuntimeError):
    pass


@dataclass
class ServiceState:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    pool: InlineEncodes  # on-the-spot encodes: bounded slots, perhaps sent to a worker's accelerator
    registry: IndexRegistry
    synchronizer: IndexSynchronizer
    keys: KeyCache
    entities: EntityFollower
    worker: EncoderWorker | None = None  # the embedded default's in-process worker, on the bare pool
    trainer: JobRunner | None = None  # the embedded worker's training jobs, each run in a child process
    save_indexes: bool = True  # writes the index files (periodically and at close)
    threads: list[threading.Thread] = field(default_factory=list)

    @classmethod
    def open(
        cls,
        settings: Settings,
        pool: EncoderPool | None = None,
        run_worker: bool = True,
        loaded: IndexSynchronizer | None = None,
        save_indexes: bool = True,
    ) -> ServiceState:
        """Connect, check the schema is migrated, and load (or rebuild) every index, unless ``loaded`` holds them
        already (``llmatch serve --workers N``: loaded once by the parent process, inherited by each API process,
        which applies the change log written since before it answers).
        ``save_indexes``: whether this process writes the index files (one of the processes is enough)."""
        engine = connect(settings)
        factory = make_session_factory(engine)
        pool = pool or EncoderPool(settings)
        if loaded is None:
            synchronizer = load_indexes(settings, factory, pool)
        else:
            synchronizer = loaded
            synchronizer.session_factory = factory  # the parent's connections were closed: this process's own
            synchronizer.poll()  # what changed since the parent loaded (a replacement forked later): before serving
        registry = synchronizer.registry
        worker = EncoderWorker(factory, pool, settings) if run_worker else None
        trainer = JobRunner(factory, settings) if run_worker else None
        inline = InlineEncodes(inline_encoder_pool(pool, settings), settings.max_inline_encodes)
        keys = KeyCache(factory, settings.auth_cache_seconds)
        entities = EntityFollower(factory, registry, Grouping.from_settings(settings))
        synchronizer.listeners.append(entities.on_index_changes)  # entities follow what enters and leaves indexes
        return cls(
            settings, engine, factory, inline, registry, synchronizer, keys, entities, worker, trainer, save_indexes
        )

    def start(self) -> None:
        """Start the index follower, the index saver, the entity follower and, on the embedded default, the
        in-process encoder worker; metrics read this database from now on."""
        metrics.QUEUE.session_factory = metrics.AUDIT.session_factory = self.session_factory
        interval = self.settings.index_sync_seconds
        self._spawn("index-sync", lambda: self.synchronizer.run(interval))
        if self.save_indexes and self.settings.index_save_seconds > 0:
            self._spawn("index-save", self._save_indexes_periodically)
        self._spawn("entities", lambda: self.entities.run(self.synchronizer.stop_event))
        if self.worker is not None:
            self._spawn("encoder-worker", self.worker.run)
        if self.trainer is not None:
            self._spawn("training-jobs", self.trainer.run)

    def _save_indexes_periodically(self) -> None:
        """Write changed indexes to their files every ``index_save_seconds``, so a crash costs no full rebuild."""
        every = self.settings.index_save_seconds
        while not self.synchronizer.stop_event.wait(every):
            try:
                self.registry.save_changed()
            except OSError:
                log.exception("could not save index files; retrying at the next interval")

    def _spawn(self, name: str, target) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def close(self) -> None:
        """Stop the threads, save index files for a fast next start, release the database."""
        self.synchronizer.stop_event.set()
        if self.worker is not None:
            self.worker.stop()
        if self.trainer is not None:
            self.trainer.stop()
        for thread in self.threads:
            thread.join(timeout=60)
        if self.save_indexes:
            try:
                self.registry.save_all()
            except OSError:
                log.exception("could not save index files; they will be rebuilt at the next start")
        if metrics.QUEUE.session_factory is self.session_factory:
            metrics.QUEUE.session_factory = metrics.AUDIT.session_factory = None
        self.engine.dispose()

    def searching(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` (a search that reads its dataset afresh); when this process's indexes lag behind a switch
        to a new encoder version (``IndexBehind``), apply the change log now and run it once more, so no answer
        compares vectors of two versions; 503 if they still lag."""
        try:
            return attempt()
        except IndexBehind:
            self.synchronizer.poll()
        try:
            return attempt()
        except IndexBehind as error:
            raise ServiceUnavailable(
                "The dataset is switching to a new encoder version and this process has not caught up yet; "
                "retry in a moment.",
            ) from error

    def database_ok(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - readiness reports any failure as not ready
            return False


def connect(settings: Settings) -> Engine:
    """An engine on the configured database, whose schema is migrated (else ``SchemaNotReadyError``)."""
    engine = make_engine(settings.resolved_database_url, settings.db_pool_size)
    problem = ensure_schema(engine)
    if problem:
        engine.dispose()
        raise SchemaNotReadyError(problem)
    return engine


def load_indexes(settings: Settings, factory: sessionmaker[Session], pool: EncoderPool) -> IndexSynchronizer:
    """Hold every dataset to the encoder configuration its name maps to now, then load (or rebuild) every index."""
    use_gpu = settings.faiss_gpu == "auto" and gpu_available()
    registry = IndexRegistry(settings.index_dir, use_gpu=use_gpu, policy=IndexPolicy.from_settings(settings))
    synchronizer = IndexSynchronizer(factory, registry)
    follow_encoder_keys(factory, lambda name: _encoder_key(pool, name))
    synchronizer.load_all()
    return synchronizer


def _encoder_key(pool: EncoderPool, name: str) -> str | None:
    """The key of the configuration an encoder name maps to now; None (logged) when the name is unknown."""
    try:
        return pool.spec(name).key
    except UnknownEncoderError:
        log.warning("encoder %r is not configured: its datasets' vectors and calibration are left as they are", name)
        return None
