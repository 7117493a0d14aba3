"""The encoder worker: claim pending records, encode what the content cache lacks, store, mark encoded.

A claim is processed in encoder batches, each stored as soon as it is encoded, while a heartbeat renews the
claim's lease. A failing batch is told apart from an unavailable encoder by a probe: when the encoder cannot
encode a one-word text either, the records are given back without spending their attempts and the encoder is
retried after a growing delay; otherwise the records are encoded one by one and only those failing alone are
charged."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from encoder_worker import metrics
from encoder_worker.queue import (
    Claim,
    ClaimedRecord,
    claim_batch,
    complete,
    give_back,
    mark_encoded,
    mark_inflight,
    release,
    renew,
    unclaim,
)
from encoding.encoder import EncoderInput
from encoding.registry import EncoderPool, EncoderUnavailableError, UnknownEncoderError
from llmatch.db import transaction
from llmatch.models import PENDING, Record
from llmatch.settings import Settings
from llmatch.vectors import find_embeddings, store_embeddings

log = logging.getLogger("llmatch.worker")

PROBE = EncoderInput(None, "probe")
MAX_OUTAGE_DELAY = 60.0


class EncoderOutage(RuntimeError):
    """The encoder failed on a trivial text too: the worker's problem, not the records'."""


@dataclass
class BatchResult:
    claimed: int = 0
    encoded: int = 0
    cache_hits: int = 0
    failed: int = 0
    lost: int = 0
    given_back: int = 0


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
        self.last_progress = time.monotonic()  # when the loop last finished an iteration (health checks read it)
        self._window = Throughput()
        self._outage_delay: dict[str, float] = {}
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-db")  # stores, prefetched claims
        self._db_stopped = threading.Event()
        self._prefetched: Future[Claim] | None = None
        self._held: set[str] = set()  # tokens of the claims whose leases the heartbeat renews
        self._held_lock = threading.Lock()
        self._beat: threading.Thread | None = None

    def run_once(self) -> BatchResult:
        """Claim and process one batch; returns what happened to it.

        Pipelined: encoder batches are stored by the database thread while the next one encodes, and the next
        claim is taken while the last batch encodes, so the encoder rarely waits for bookkeeping."""
        claim = self._take_claim()
        result = BatchResult(claimed=len(claim.records))
        if not claim.records:
            return result
        stores: list[Future[None]] = []
        with self._heartbeat(claim.token):
            try:
                self._process(claim, result, stores)
            except BaseException:
                wait(stores)  # what was encoded before the failure is kept
                raise
            wait(stores)  # every store settles before a failed one is raised
            for store in stores:
                store.result()
        return result

    def _take_claim(self) -> Claim:
        """The claim prefetched during the previous batch or, when there is none or it came back empty (records
        may have been freed since), a new one."""
        prefetched, self._prefetched = self._prefetched, None
        claim = prefetched.result() if prefetched is not None else None
        return claim if claim is not None and claim.records else self._claim()

    def _claim(self) -> Claim:
        settings = self.settings
        claim = claim_batch(
            self.session_factory,
            settings.worker_batch_size,
            settings.worker_lease_seconds,
            settings.worker_max_attempts,
            max_bytes=settings.worker_claim_max_bytes,
            max_text_chars=self.pool.max_text_chars,  # the encoder's cut, so the hash is that of the text encoded
        )
        if claim.records:
            self._hold(claim.token)  # a prefetched claim waits for the batch before it: keep it alive meanwhile
        # Shorter texts first, so that each encoder batch holds texts of similar length (less padding).
        return Claim(claim.token, sorted(claim.records, key=lambda r: (r.encoder, len(r.text))))

    def close(self) -> None:
        """Give back a prefetched claim (its records are free at once); stop the database and heartbeat threads."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None:
            claim = prefetched.result()
            if claim.records:
                with transaction(self.session_factory) as session:
                    unclaim(session, claim.token, claim.records)
                with self._held_lock:
                    self._held.discard(claim.token)
        self._db_stopped.set()
        self._db.shutdown(wait=True)
        if self._beat is not None:
            self._beat.join()

    def run(self) -> None:
        """Process batches until ``stop()``; sleeps while the queue is empty."""
        log.info(
            "encoder worker started (batch %d, lease %.0fs renewed while alive)",
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
            self.last_progress = time.monotonic()
            self._log_progress(result)
            if result.claimed == 0:
                self.stop_event.wait(self.settings.worker_poll_seconds)
        self.close()
        log.info("encoder worker stopped")

    def stop(self) -> None:
        self.stop_event.set()

    @contextmanager
    def _heartbeat(self, token: str) -> Iterator[None]:
        """Keep renewing the claim's lease while the block runs (the claim is held from when it is taken)."""
        self._hold(token)
        try:
            yield
        finally:
            with self._held_lock:
                self._held.discard(token)

    def _hold(self, token: str) -> None:
        """Renew this claim's lease every third of it until it is let go; one thread renews every held claim
        (the one being encoded and the one prefetched)."""
        with self._held_lock:
            self._held.add(token)
            if self._beat is None:
                self._beat = threading.Thread(target=self._renew_held, name="lease-heartbeat", daemon=True)
                self._beat.start()

    def _renew_held(self) -> None:
        interval = self.settings.worker_lease_seconds / 3
        while not self._db_stopped.wait(interval):
            with self._held_lock:
                tokens = list(self._held)
            for token in tokens:
                try:
                    with transaction(self.session_factory) as session:
                        renew(session, token, self.settings.worker_lease_seconds)
                except Exception:  # noqa: BLE001 - a missed beat only shortens the lease; the next one retries
                    log.warning("could not renew the lease of claim %s", token[:8], exc_info=True)

    def _process(self, claim: Claim, result: BatchResult, stores: list[Future[None]]) -> None:
        """Encode a claim's records one encoder batch at a time; the database thread stores each."""
        by_encoder: dict[str, list[ClaimedRecord]] = defaultdict(list)
        for record in claim.records:
            by_encoder[record.encoder].append(record)
        plan = [(name, chunk) for name, records in by_encoder.items() for chunk in self._chunks(records)]
        done_encoders: set[str] = set()
        for position, (encoder_name, chunk) in enumerate(plan):
            if position == len(plan) - 1 and not self.stop_event.is_set():
                self._prefetched = self._db.submit(self._claim)
            if encoder_name in done_encoders:
                continue
            try:
                encoder_key = self.pool.spec(encoder_name).key
                vectors, errors = self._encode_missing(claim.token, encoder_key, encoder_name, chunk, result)
            except (EncoderOutage, EncoderUnavailableError, UnknownEncoderError) as error:  # not the records' fault
                unfinished = [r for name, c in plan[position:] if name == encoder_name for r in c]
                delay = self._next_outage_delay(encoder_name)
                give = self._give_back
                stores.append(self._db.submit(give, claim.token, encoder_name, unfinished, error, delay, result))
                done_encoders.add(encoder_name)
                continue
            self._outage_delay.pop(encoder_name, None)
            if vectors or errors:  # queued before the store: a death from now on blames none of these records
                stores.append(self._db.submit(self._mark_encoded, claim.token, chunk))
            batch = (claim.token, encoder_name, encoder_key, chunk, vectors, errors, result)
            stores.append(self._db.submit(self._store_batch, *batch))

    def _chunks(self, records: list[ClaimedRecord]) -> Iterator[list[ClaimedRecord]]:
        """Encoder batches: records whose last group died (or that failed) in groups no larger than their
        ``batch_limit``, smallest first; the rest in batches of ``worker_commit_size``."""
        size = self.settings.worker_commit_size
        by_limit: dict[int, list[ClaimedRecord]] = defaultdict(list)
        for record in records:
            by_limit[min(record.batch_limit or size, size)].append(record)
        for limit in sorted(by_limit):
            group = by_limit[limit]
            for start in range(0, len(group), limit):
                yield group[start : start + limit]

    def _mark_encoded(self, token: str, records: list[ClaimedRecord]) -> None:
        """(Database thread) note that the encoder returned for these records."""
        with transaction(self.session_factory) as session:
            mark_encoded(session, token, records)

    def _store_batch(
        self,
        token: str,
        encoder_name: str,
        encoder_key: str,
        records: list[ClaimedRecord],
        vectors: dict[str, np.ndarray],
        errors: dict[str, str],
        result: BatchResult,
    ) -> None:
        """(Database thread) store an encoded batch, and give back the records that failed alone."""
        for record in (r for r in records if r.input_hash in errors):
            self._release(token, record, errors[record.input_hash], encoder_name, result)
        done = self._store(token, encoder_key, vectors, [r for r in records if r.input_hash not in errors])
        result.encoded += sum(done)
        result.lost += len(done) - sum(done)
        metrics.RECORDS_ENCODED.labels(encoder_name).inc(sum(done))

    def _store(
        self, token: str, encoder_key: str, vectors: dict[str, np.ndarray], records: list[ClaimedRecord]
    ) -> list[bool]:
        """Store new vectors and mark the records encoded, in one transaction."""
        if not records:
            return []
        for attempt in range(2):
            try:
                with transaction(self.session_factory) as session:
                    ids = store_embeddings(session, encoder_key, vectors)
                    ids.update(find_embeddings(session, encoder_key, {r.input_hash for r in records} - set(ids)))
                    held = complete(session, token, [(r, ids[r.input_hash]) for r in records])
                    return [r.record_id in held for r in records]
            except IntegrityError:
                if attempt == 1:
                    raise
                log.info("another worker stored the same texts first; retrying the write")
        return []

    def _encode_missing(
        self,
        token: str,
        encoder_key: str,
        encoder_name: str,
        records: Sequence[ClaimedRecord],
        result: BatchResult,
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Encode the distinct inputs the content cache lacks: (vectors, errors) by input hash."""
        todo = self._prepare(token, encoder_key, records)
        hits = sum(1 for r in records if r.input_hash not in todo)
        result.cache_hits += hits
        metrics.CACHE_HITS.labels(encoder_name).inc(hits)
        if not todo:
            return {}, {}
        started = time.perf_counter()
        try:
            vectors = dict(zip(todo, self.pool.encode(encoder_name, list(todo.values())), strict=True))
            errors: dict[str, str] = {}
        except Exception as error:  # noqa: BLE001 - the texts' fault, or the encoder's? ask a probe
            self._probe(encoder_name, error)
            vectors, errors = self._encode_one_by_one(encoder_name, todo) if len(todo) > 1 else ({}, {})
            if len(todo) == 1:
                errors = {next(iter(todo)): _describe(error)}
        metrics.BATCH_SECONDS.labels(encoder_name).observe(time.perf_counter() - started)
        metrics.ENCODER_INPUTS.labels(encoder_name).inc(len(todo))
        return vectors, errors

    def _prepare(self, token: str, encoder_key: str, records: Sequence[ClaimedRecord]) -> dict[str, EncoderInput]:
        """The distinct inputs the content cache lacks, by input hash, with their records noted in flight: one
        transaction, committed before the encoder starts."""
        with transaction(self.session_factory) as session:
            cached = find_embeddings(session, encoder_key, {r.input_hash for r in records})
            todo: dict[str, EncoderInput] = {}
            for record in records:
                if record.input_hash not in cached:
                    todo.setdefault(record.input_hash, EncoderInput(record.instruction, record.text))
            if todo:
                mark_inflight(session, token, [r for r in records if r.input_hash in todo], len(todo))
        return todo

    def _probe(self, encoder_name: str, error: Exception) -> None:
        """Raise ``EncoderOutage`` when the encoder cannot encode a trivial text either."""
        try:
            self.pool.encode(encoder_name, [PROBE])
        except Exception as probe_error:  # noqa: BLE001 - any failure on the probe means the encoder is down
            raise EncoderOutage(_describe(probe_error)) from error

    def _encode_one_by_one(
        self, encoder_name: str, todo: dict[str, EncoderInput]
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        vectors: dict[str, np.ndarray] = {}
        errors: dict[str, str] = {}
        for key, item in todo.items():
            try:
                vectors[key] = self.pool.encode(encoder_name, [item])[0]
            except Exception as error:  # noqa: BLE001 - recorded on the record, retried later
                errors[key] = _describe(error)
        log.warning("encoder %s: %d of %d texts failed alone", encoder_name, len(errors), len(todo))
        return vectors, errors

    def _release(self, token: str, record: ClaimedRecord, error: str, encoder_name: str, result: BatchResult) -> None:
        retry_after = min(self.settings.worker_lease_seconds, 5.0 * (record.attempts + 1))
        with transaction(self.session_factory) as session:
            outcome = release(session, token, record, error, self.settings.worker_max_attempts, retry_after)
        result.failed += outcome != PENDING
        metrics.RECORDS_FAILED.labels(encoder_name).inc()

    def _next_outage_delay(self, encoder_name: str) -> float:
        """How long an unavailable encoder's records wait: doubling with each outage in a row, at most a minute."""
        delay = min(MAX_OUTAGE_DELAY, self._outage_delay.get(encoder_name, self.settings.worker_poll_seconds) * 2)
        self._outage_delay[encoder_name] = delay
        return delay

    def _give_back(
        self,
        token: str,
        encoder_name: str,
        records: list[ClaimedRecord],
        error: Exception,
        delay: float,
        result: BatchResult,
    ) -> None:
        """(Database thread) the encoder is unavailable: return the unfinished records without spending
        attempts; they are claimed again after ``delay``."""
        with transaction(self.session_factory) as session:
            given = give_back(session, token, records, f"encoder unavailable: {_describe(error)}", delay)
        result.given_back += given
        log.warning(
            "encoder %s unavailable (%s); %d records given back, retrying in %.1fs",
            encoder_name,
            _describe(error),
            given,
            delay,
        )

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


def _describe(error: BaseException) -> str:
    if isinstance(error, EncoderOutage):
        return str(error)
    return f"{error.__class__.__name__}: {error}"
