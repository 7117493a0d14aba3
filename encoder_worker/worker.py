"""The encoder worker: claim pending records, encode what the content cache lacks, store, mark encoded."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from encoder_worker import metrics
from encoder_worker.encoders.base import EncoderInput
from encoder_worker.encoders.registry import EncoderPool
from encoder_worker.queue import ClaimedRecord, claim_batch, complete, release
from llmatch.db import transaction
from llmatch.models import PENDING, Record
from llmatch.settings import Settings
from llmatch.vectors import find_embeddings, store_embeddings

log = logging.getLogger("llmatch.worker")


@dataclass
class BatchResult:
    claimed: int = 0
    encoded: int = 0
    cache_hits: int = 0
    failed: int = 0
    lost: int = 0


@dataclass
class Throughput:
    """Counts since the last progress log line."""

    started: float = field(default_factory=time.monotonic)
    encoded: int = 0
    cache_hits: int = 0


class EncoderWorker:
    """One worker loop. Several may run against PostgreSQL; each claims different records."""

    def __init__(self, session_factory: sessionmaker[Session], pool: EncoderPool, settings: Settings):
        self.session_factory = session_factory
        self.pool = pool
        self.settings = settings
        self.stop_event = threading.Event()
        self._window = Throughput()

    def run_once(self) -> BatchResult:
        """Claim and process one batch; returns what happened to it."""
        with transaction(self.session_factory) as session:
            claim = claim_batch(session, self.settings.worker_batch_size, self.settings.worker_lease_seconds)
        result = BatchResult(claimed=len(claim.records))
        by_encoder: dict[str, list[ClaimedRecord]] = defaultdict(list)
        for record in claim.records:
            by_encoder[record.encoder].append(record)
        for encoder_name, records in by_encoder.items():
            self._process(claim.token, encoder_name, records, result)
        return result

    def run(self) -> None:
        """Process batches until ``stop()``; sleeps while the queue is empty."""
        log.info(
            "encoder worker started (batch %d, lease %.0fs)",
            self.settings.worker_batch_size,
            self.settings.worker_lease_seconds,
        )
        while not self.stop_event.is_set():
            try:
                result = self.run_once()
            except Exception:  # noqa: BLE001 - the loop survives; claimed records come back when their lease ends
                log.exception("batch failed; its records will be claimed again after their lease")
                result = BatchResult()
                self.stop_event.wait(self.settings.worker_poll_seconds * 4)
            self._log_progress(result)
            if result.claimed == 0:
                self.stop_event.wait(self.settings.worker_poll_seconds)
        log.info("encoder worker stopped")

    def stop(self) -> None:
        self.stop_event.set()

    def _process(self, token: str, encoder_name: str, records: list[ClaimedRecord], result: BatchResult) -> None:
        try:
            encoder_key = self.pool.spec(encoder_name).key
            vectors, errors = self._encode_missing(encoder_key, encoder_name, records, result)
        except Exception as error:  # noqa: BLE001 - e.g. the encoder cannot load: give the records back
            log.exception("encoder %s failed on a batch of %d", encoder_name, len(records))
            self._release(token, records, f"{error.__class__.__name__}: {error}", encoder_name, result)
            return
        failed = [r for r in records if r.input_hash in errors]
        for record in failed:
            self._release(token, [record], errors[record.input_hash], encoder_name, result)
        done = self._store(token, encoder_key, vectors, [r for r in records if r.input_hash not in errors])
        result.encoded += sum(done)
        result.lost += len(done) - sum(done)
        metrics.RECORDS_ENCODED.labels(encoder_name).inc(sum(done))

    def _store(
        self, token: str, encoder_key: str, vectors: dict[str, np.ndarray], records: list[ClaimedRecord]
    ) -> list[bool]:
        """Store new vectors and mark the records encoded, in one transaction."""
        for attempt in range(2):
            try:
                with transaction(self.session_factory) as session:
                    ids = store_embeddings(session, encoder_key, vectors)
                    ids.update(find_embeddings(session, encoder_key, {r.input_hash for r in records} - set(ids)))
                    return [complete(session, token, r, ids[r.input_hash]) for r in records]
            except IntegrityError:
                if attempt == 1:
                    raise
                log.info("another worker stored the same texts first; retrying the write")
        return []

    def _encode_missing(
        self, encoder_key: str, encoder_name: str, records: Sequence[ClaimedRecord], result: BatchResult
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Encode the distinct inputs the content cache lacks: (vectors, errors) by input hash."""
        with self.session_factory() as session:
            cached = find_embeddings(session, encoder_key, {r.input_hash for r in records})
        todo: dict[str, EncoderInput] = {}
        for record in records:
            if record.input_hash not in cached:
                todo.setdefault(record.input_hash, EncoderInput(record.instruction, record.text))
        hits = sum(1 for r in records if r.input_hash in cached)
        result.cache_hits += hits
        metrics.CACHE_HITS.labels(encoder_name).inc(hits)
        if not todo:
            return {}, {}
        started = time.perf_counter()
        try:
            vectors = dict(zip(todo, self.pool.encode(encoder_name, list(todo.values())), strict=True))
            errors: dict[str, str] = {}
        except Exception:  # noqa: BLE001 - find the inputs that fail, encode the rest
            if len(todo) == 1:
                raise
            vectors, errors = self._encode_one_by_one(encoder_name, todo)
        metrics.BATCH_SECONDS.labels(encoder_name).observe(time.perf_counter() - started)
        metrics.ENCODER_INPUTS.labels(encoder_name).inc(len(todo))
        return vectors, errors

    def _encode_one_by_one(
        self, encoder_name: str, todo: dict[str, EncoderInput]
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        vectors: dict[str, np.ndarray] = {}
        errors: dict[str, str] = {}
        for key, item in todo.items():
            try:
                vectors[key] = self.pool.encode(encoder_name, [item])[0]
            except Exception as error:  # noqa: BLE001 - recorded on the record, retried later
                errors[key] = f"{error.__class__.__name__}: {error}"
        log.warning("encoder %s: %d of %d texts failed alone", encoder_name, len(errors), len(todo))
        return vectors, errors

    def _release(
        self, token: str, records: Sequence[ClaimedRecord], error: str, encoder_name: str, result: BatchResult
    ) -> None:
        retry_after = min(self.settings.worker_lease_seconds, 5.0 * max(r.attempts for r in records))
        with transaction(self.session_factory) as session:
            outcomes = [
                release(session, token, r, error, self.settings.worker_max_attempts, retry_after) for r in records
            ]
        failed = sum(1 for outcome in outcomes if outcome != PENDING)
        result.failed += failed
        metrics.RECORDS_FAILED.labels(encoder_name).inc(len(records))

    def _log_progress(self, result: BatchResult) -> None:
        window = self._window
        window.encoded += result.encoded
        window.cache_hits += result.cache_hits
        elapsed = time.monotonic() - window.started
        if elapsed < self.settings.worker_log_seconds or (window.encoded == 0 and result.claimed == 0):
            return
        log.info(
            "encoded %d records in %.1fs (%.1f records/s, %d from cache); queue depth %d",
            window.encoded,
            elapsed,
            window.encoded / elapsed,
            window.cache_hits,
            self.queue_depth(),
        )
        self._window = Throughput()

    def queue_depth(self) -> int:
        with self.session_factory() as session:
            return session.scalar(select(func.count()).select_from(Record).where(Record.status == PENDING)) or 0

    def drain(self) -> int:
        """Process batches until none is left to claim (records leased by others are not waited for);
        returns how many records this worker encoded."""
        started, encoded = time.monotonic(), 0
        while not self.stop_event.is_set():
            result = self.run_once()
            encoded += result.encoded
            self._log_progress(result)
            if result.claimed == 0:
                break
        log.info("drained: encoded %d records in %.1fs", encoded, time.monotonic() - started)
        return encoded
