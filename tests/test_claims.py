"""Claim bookkeeping: what a claim holds in memory, a worker dying while it reads a claim, records put back to the
queue starting clean, and their old vectors not outliving them."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Callable
from datetime import timedelta

import pytest
from conftest import CountingPool, records_body
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

import encoder_worker.queue
from encoder_worker.queue import claim_batch, settle_expired
from encoder_worker.worker import EncoderWorker
from encoding.recipe import record_input
from encoding.render import RenderConfig, input_hash, render
from llmatch.db import db_now, transaction
from llmatch.models import ENCODED, FAILED, PENDING, Embedding, Record

MAX_ATTRIBUTES, MAX_VALUE_CHARS = 256, 65_536  # the contract's maxima for one record

STALE = {"claim_token": "old", "inflight_batch": 1, "batch_limit": 1, "error": "old error", "attempts": 2}


class Crash(BaseException):
    """Stands for the worker process dying (nothing after it runs, no cleanup reaches the database)."""


class DyingPool(CountingPool):
    """The real pool, 'dying' on every encoder call."""

    def encode(self, name, inputs):
        raise Crash


def _rows(n: int, word: str = "item") -> list[tuple[str, dict]]:
    return [(str(i), {"name": f"{word} {i} wireless compact"}) for i in range(n)]


def _factory(client: TestClient):
    return client.app.state.service.session_factory


def _make_stale(client: TestClient, status: str = PENDING) -> None:
    """Leave every record as a worker that was encoding it alone left it (and as an earlier failure did)."""
    with transaction(_factory(client)) as session:
        until = db_now(session) + timedelta(seconds=60)
        session.execute(update(Record).values(status=status, lease_until=until, **STALE))


def _replace(client: TestClient) -> None:
    client.post("/records", json=records_body("shop", "a", _rows(3, "changed")))


def _reconfigure(client: TestClient) -> None:
    assert client.put("/datasets/shop", json={"serialization": "plain"}).status_code == 200


def _requeue_failed(client: TestClient) -> None:
    assert client.post("/datasets/shop/requeue", json={"status": "failed"}).json() == {"requeued": 3}


@pytest.mark.parametrize(
    ("status", "put_back"),
    [(PENDING, _replace), (PENDING, _reconfigure), (FAILED, _requeue_failed)],
    ids=["replaced", "reconfigured", "requeued"],
)
def test_a_record_put_back_to_the_queue_keeps_nothing_of_its_claim(
    client, status: str, put_back: Callable[[TestClient], None]
):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(3)))
    _make_stale(client, status)
    put_back(client)
    with _factory(client)() as session:
        rows = session.execute(
            select(
                Record.status,
                Record.claim_token,
                Record.lease_until,
                Record.inflight_batch,
                Record.batch_limit,
                Record.error,
                Record.attempts,
                Record.embedding_id,
            )
        ).all()
    assert set(rows) == {(PENDING, None, None, None, None, None, 0, None)}


def test_a_replaced_record_is_not_blamed_for_a_death_its_old_version_was_near(client, settings, counting_pool):
    """The old version was being encoded alone; the new one goes in a group, and a death there blames no one."""
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(5)))
    factory = _factory(client)
    with transaction(factory) as session:
        until = db_now(session) + timedelta(seconds=60)
        session.execute(
            update(Record)
            .where(Record.external_id == "0")
            .values(claim_token="old", lease_until=until, inflight_batch=1, batch_limit=1)
        )
    client.post("/records", json=records_body("shop", "a", [("0", {"name": "a new version of item 0"})]))
    worker = EncoderWorker(factory, DyingPool(counting_pool), settings)
    with pytest.raises(Crash):
        worker.run_once()
    worker.close()
    with transaction(factory) as session:
        session.execute(update(Record).values(lease_until=db_now(session) - timedelta(seconds=1)))
    with transaction(factory) as session:
        assert settle_expired(session, max_attempts=3) == 5
    with factory() as session:
        assert session.scalar(select(func.max(Record.attempts))) == 0, "a death in a group blames no one"


def _replace_both(client: TestClient) -> None:
    rows = [("x1", {"name": "new text of x1"}), ("x2", {"name": "new text of x2"})]
    assert client.post("/records", json=records_body("shop", "a", rows)).json()["updated"] == 2


def _plain(client: TestClient) -> None:
    assert client.put("/datasets/shop", json={"serialization": "plain"}).status_code == 200


def _embedding_of(factory, external_id: str) -> int | None:
    with factory() as session:
        return session.scalar(select(Record.embedding_id).where(Record.external_id == external_id))


@pytest.mark.parametrize("put_back", [_replace_both, _plain], ids=["replaced", "reconfigured"])
def test_vectors_no_record_holds_any_more_are_deleted(client, drain, put_back: Callable[[TestClient], None]):
    client.put("/datasets/shop", json={})
    client.put("/datasets/other", json={})
    rows = [("x1", {"name": "a text only shop has"}), ("x2", {"name": "a text both datasets have"})]
    client.post("/records", json=records_body("shop", "a", rows))
    client.post("/records", json=records_body("other", "a", [("y1", {"name": "a text both datasets have"})]))
    drain()
    factory = _factory(client)
    only_shop, shared = _embedding_of(factory, "x1"), _embedding_of(factory, "x2")
    assert only_shop is not None and shared == _embedding_of(factory, "y1")
    put_back(client)
    with factory() as session:
        kept = set(session.scalars(select(Embedding.id)))
    assert only_shop not in kept, "the vector of a text no record has any more was kept"
    assert shared in kept and _embedding_of(factory, "y1") == shared, "a vector another dataset holds was deleted"
    drain()
    assert client.get("/records/other/a/y1").json()["status"] == "encoded"
    assert {client.get(f"/records/shop/a/{rid}").json()["status"] for rid in ("x1", "x2")} == {"encoded"}
    with factory() as session:
        held = set(session.scalars(select(Record.embedding_id)))
        assert set(session.scalars(select(Embedding.id))) == held, "every stored vector belongs to a record"


# ------------------------------------------------------------------------------ what a claim holds in memory


def _maximal_record() -> dict[str, str]:
    return {f"attribute{i}": chr(ord("a") + i % 26) * MAX_VALUE_CHARS for i in range(MAX_ATTRIBUTES)}


def test_rendering_a_maximal_record_stops_at_the_cut():
    attributes = _maximal_record()
    config = RenderConfig("tagged")
    tracemalloc.start()
    try:
        text = render(attributes, config, max_chars=16_384)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    full = render(attributes, config)
    assert len(full) > 16_000_000 and text == full[:16_384]
    assert peak < 1_000_000, f"rendering held {peak} bytes; the full text is {len(full)} characters"


@pytest.mark.parametrize("serialization", ["tagged", "plain"])
def test_a_cut_rendering_is_the_full_one_cut(serialization: str):
    """Within the cut the text (and so its hash) is exactly the full rendering; beyond it, its first characters."""
    rng = random.Random(7)
    for _ in range(300):
        attributes = {
            f"c{i}": rng.choice([None, "", "  ", 3.0, 12.5, 7, "x" * rng.randint(1, 40), " padded value "])
            for i in range(rng.randint(0, 8))
        }
        fixed = rng.choice([None, ["c2", "c0", "missing"]])
        config = RenderConfig(serialization, fixed, rng.choice([None, "find the product"]))
        full = render(attributes, config, ["c3", "c1"])
        for limit in {1, len(full) - 1, len(full), len(full) + 1, rng.randint(1, 200)} - {0, -1}:
            assert render(attributes, config, ["c3", "c1"], max_chars=limit) == full[:limit]


def _big_rows(n: int, chars: int) -> list[tuple[str, dict]]:
    return [(str(i), {"name": f"{i} " + "w" * chars}) for i in range(n)]


def test_a_claim_stops_taking_records_at_its_byte_cap(client, settings, counting_pool):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _big_rows(6, 40_000)))
    factory = _factory(client)
    claim = claim_batch(factory, 16, 60, max_bytes=100_000, max_text_chars=1000)
    assert len(claim.records) == 2, "two records of 40 kB fit in 100 kB, a third does not"
    assert {len(record.text) for record in claim.records} == {1000}
    alone = claim_batch(factory, 16, 60, max_bytes=1024, max_text_chars=1000)
    assert len(alone.records) == 1, "a record larger than the cap is claimed alone"
    capped = settings.model_copy(update={"worker_claim_max_bytes": 100_000})
    with transaction(factory) as session:
        session.execute(update(Record).values(claim_token=None, lease_until=None, inflight_batch=None))
    worker = EncoderWorker(factory, counting_pool, capped)
    try:
        assert worker.run_once().claimed == 2
    finally:
        worker.close()  # stop its heartbeat before the test's database goes


def test_a_maximal_record_is_claimed_cut_and_hashed_as_encoded(client, settings, counting_pool, drain):
    """The worker keeps only the text the encoder sees, hashed as such; the API finds that same vector for the
    same record given inline (both cut the same way)."""
    client.put("/datasets/big", json={"serialization": "plain"})
    huge = _maximal_record()
    assert client.post("/records", json=records_body("big", "a", [("r1", huge)])).status_code == 202
    claim = claim_batch(_factory(client), 16, 60, max_text_chars=counting_pool.max_text_chars)
    (record,) = claim.records
    assert record.text == render(huge, RenderConfig("plain"))[: counting_pool.max_text_chars]
    assert record.input_hash == input_hash(None, record.text)
    with transaction(_factory(client)) as session:
        session.execute(update(Record).values(claim_token=None, lease_until=None, inflight_batch=None))
    drain()
    with _factory(client)() as session:
        assert session.scalars(select(Embedding.input_hash)).all() == [record.input_hash]
    calls = len(counting_pool.calls)
    response = client.post("/candidates", json={"dataset": "big", "record": {"attributes": huge}})
    assert response.status_code == 200, response.text
    assert len(counting_pool.calls) == calls, "the inline record was encoded again instead of found"


# ------------------------------------------------------------------------------ a worker dying in its claim


def _dies_reading(marker: str) -> Callable:
    """``record_input`` as a record whose reading kills its worker (out of memory) meets it."""

    def record_input_or_die(attributes, *args, **kwargs):
        if any(marker in str(value) for value in attributes.values()):
            raise Crash
        return record_input(attributes, *args, **kwargs)

    return record_input_or_die


def _close(worker: EncoderWorker) -> bool:
    """Close a worker; True when its prefetched claim died while being read (the process would be gone)."""
    try:
        worker.close()
    except Crash:
        worker.close()  # the prefetched claim is let go of; stop the worker's threads
        return True
    return False


def test_a_record_that_kills_its_worker_while_read_fails_alone(client, settings, counting_pool, monkeypatch):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(3) + [("bad", {"name": "HUGE record"})]))
    factory = _factory(client)
    monkeypatch.setattr(encoder_worker.queue, "record_input", _dies_reading("HUGE"))
    settings = settings.model_copy(update={"worker_max_attempts": 3})
    deaths = 0
    for _ in range(12):  # each death is followed by a new worker once the lease has run out
        worker = EncoderWorker(factory, counting_pool, settings)
        try:
            claimed = worker.run_once().claimed
        except Crash:
            deaths, claimed = deaths + 1, None
        deaths += _close(worker)
        if claimed == 0:
            break
        with transaction(factory) as session:
            session.execute(update(Record).values(lease_until=db_now(session) - timedelta(seconds=1)))
    with factory() as session:
        states = dict(session.execute(select(Record.external_id, Record.status)).all())
        attempts = dict(session.execute(select(Record.external_id, Record.attempts)).all())
    assert states == {"0": ENCODED, "1": ENCODED, "2": ENCODED, "bad": FAILED}, f"after {deaths} deaths"
    assert attempts == {"0": 0, "1": 0, "2": 0, "bad": 3}
    assert deaths == 4, "one death reading the whole claim (then each alone), three reading the record alone"
    assert "died 3 times" in client.get("/records/shop/a/bad").json()["error"]
