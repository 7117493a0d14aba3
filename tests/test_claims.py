"""Claim bookkeeping: records put back to the queue start clean, and their old vectors do not outlive them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from conftest import CountingPool, records_body
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from encoder_worker.queue import settle_expired
from encoder_worker.worker import EncoderWorker
from llmatch.db import db_now, transaction
from llmatch.models import FAILED, PENDING, Embedding, Record

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
