"""What the API process holds: database, encoders, indexes, and the background threads around them."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from encoder_worker.worker import EncoderWorker
from encoding.registry import EncoderPool, UnknownEncoderError
from llmatch.db import make_engine, make_session_factory
from llmatch.migrate import ensure_schema
from llmatch.settings import Settings
from matching.index_gpu import gpu_available
from matching.index_policy import IndexPolicy
from matching.index_sync import IndexSynchronizer, follow_encoder_keys
from matching.registry import IndexRegistry

log = logging.getLogger("llmatch.api")


class SchemaNotReadyError(RuntimeError):
    pass


@dataclass
class ServiceState:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    pool: EncoderPool
    registry: IndexRegistry
    synchronizer: IndexSynchronizer
    worker: EncoderWorker | None = None
    threads: list[threading.Thread] = field(default_factory=list)

    @classmethod
    def open(cls, settings: Settings, pool: EncoderPool | None = None, run_worker: bool = True) -> ServiceState:
        """Connect, check the schema is migrated, and load (or rebuild) every index."""
        engine = make_engine(settings.resolved_database_url, settings.db_pool_size)
        problem = ensure_schema(engine)
        if problem:
            engine.dispose()
            raise SchemaNotReadyError(problem)
        factory = make_session_factory(engine)
        pool = pool or EncoderPool(settings)
        use_gpu = settings.faiss_gpu == "auto" and gpu_available()
        registry = IndexRegistry(settings.index_dir, use_gpu=use_gpu, policy=IndexPolicy.from_settings(settings))
        synchronizer = IndexSynchronizer(factory, registry)
        follow_encoder_keys(factory, lambda name: _encoder_key(pool, name))
        synchronizer.load_all()
        worker = EncoderWorker(factory, pool, settings) if run_worker else None
        return cls(settings, engine, factory, pool, registry, synchronizer, worker)

    def start(self) -> None:
        """Start the index follower and, on the embedded default, the in-process encoder worker."""
        interval = self.settings.index_sync_seconds
        self._spawn("index-sync", lambda: self.synchronizer.run(interval))
        if self.settings.index_save_seconds > 0:
            self._spawn("index-save", self._save_indexes_periodically)
        if self.worker is not None:
            self._spawn("encoder-worker", self.worker.run)

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
        for thread in self.threads:
            thread.join(timeout=60)
        try:
            self.registry.save_all()
        except OSError:
            log.exception("could not save index files; they will be rebuilt at the next start")
        self.engine.dispose()

    def database_ok(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - readiness reports any failure as not ready
            return False


def _encoder_key(pool: EncoderPool, name: str) -> str | None:
    """The key of the configuration an encoder name maps to now; None (logged) when the name is unknown."""
    try:
        return pool.spec(name).key
    except UnknownEncoderError:
        log.warning("encoder %r is not configured: its datasets' vectors and calibration are left as they are", name)
        return None
