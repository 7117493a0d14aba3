"""The worker's store path: a batch is completed in one statement (records still held by the claim only), and a
store that fails leaves its records to the lease mechanism: claimed again, stored exactly once, no one blamed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from conftest import CountingPool, records_body
from sqlalchemy import func, select, update

import encoder_worker.worker
from encoder_worker.queue import settle_expired
from encoder_worker.worker import EncoderWorker
from llmatch.db import db_now, transaction
from llmatch.models import ENCODED, PENDING, Embedding, IndexChange, Record


def _rows(n: int, word: str = "item") -> list[tuple[str, dict]]:
    return [(str(i), {"name": f"{word} {i} wireless compact"}) for i in range(n)]


def _factory(client):
    return client.app.state.service.session_factory


def _statuses(factory) -> dict[str, str]:
    with factory() as session:
        return dict(session.execute(select(Record.external_id, Record.status)).all())


def _logged(factory) -> dict[str, int]:
    """How many index-log entries with a vector each record has."""
    with factory() as session:
        rows = session.execute(
            select(Record.external_id, func.count(IndexChange.id))
            .join(IndexChange, IndexChange.record_id == Record.id)
            .where(IndexChange.embedding_id.is_not(None))
            .group_by(Record.external_id)
        ).all()
    return dict(rows)


class ReplacingOnFirstCall(CountingPool):
    """The real pool; its first encoder call replaces one record of the batch through the API, as a client
    updating a record while the worker encodes its old version."""

    def __init__(self, inner: CountingPool, client, external_id: str):
        super().__init__(inner)
        self.client, self.external_id, self.replaced = client, external_id, False

    def encode(self, name, inputs):
        if not self.replaced:
            self.replaced = True
            row = [(self.external_id, {"name": "a new version while the old one encodes"})]
            assert self.client.post("/records", json=records_body("shop", "a", row)).json()["updated"] == 1
        return super().encode(name, inputs)


def test_a_record_replaced_while_its_batch_encodes_is_not_completed(client, settings, counting_pool):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(10)))
    factory = _factory(client)
    worker = EncoderWorker(factory, ReplacingOnFirstCall(counting_pool, client, "3"), settings)
    try:
        result = worker.run_once()
    finally:
        worker.close()
    assert (result.claimed, result.encoded, result.lost) == (10, 9, 1)
    statuses = _statuses(factory)
    assert statuses.pop("3") == PENDING and set(statuses.values()) == {ENCODED}
    assert _logged(factory) == {str(i): 1 for i in range(10) if i != 3}, "the replaced record's old vector logged"
    EncoderWorker(factory, counting_pool, settings).drain()
    assert set(_statuses(factory).values()) == {ENCODED}
    assert _logged(factory) == {str(i): 1 for i in range(10)}
    assert client.get("/records/shop/a/3").json()["status"] == "encoded"


def test_a_failed_store_leaves_its_records_claimable_and_each_is_stored_once(
    client, settings, counting_pool, monkeypatch
):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(12)))
    factory = _factory(client)

    def failing_complete(*args, **kwargs):
        raise RuntimeError("the database went away mid-store")

    monkeypatch.setattr(encoder_worker.worker, "complete", failing_complete)
    worker = EncoderWorker(factory, counting_pool, settings)
    try:
        with pytest.raises(RuntimeError, match="mid-store"):
            worker.run_once()
    finally:
        worker.close()
    monkeypatch.undo()
    assert set(_statuses(factory).values()) == {PENDING}
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Embedding)) == 0, "the failed store was rolled back"
        assert session.scalar(select(func.count()).where(Record.claim_token.is_not(None))) == 12, "still claimed"
    assert _logged(factory) == {}

    with transaction(factory) as session:  # the lease runs out (the worker was alive, but never finished)
        session.execute(update(Record).values(lease_until=db_now(session) - timedelta(seconds=1)))
    with transaction(factory) as session:
        assert settle_expired(session, settings.worker_max_attempts) == 12
    calls = len(counting_pool.calls)
    assert EncoderWorker(factory, counting_pool, settings).drain() == 12
    assert len(counting_pool.calls) - calls == 12, "each record encoded once more"
    assert set(_statuses(factory).values()) == {ENCODED}
    assert _logged(factory) == {str(i): 1 for i in range(12)}
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Embedding)) == 12
        assert session.scalars(select(Record.attempts).distinct()).all() == [0], "a failed store blames no record"
