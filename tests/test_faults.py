"""Promises kept when things go wrong: bad characters, concurrent readers on SQLite, workers that die, an
encoder that is down, late commits in the index log, stale index entries, reused ids, a fresh embedded store."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from threading import get_ident

import numpy as np
import pytest
from conftest import PRODUCTS_A, CountingPool, empty_pg_database, make_worker, records_body
from fastapi.testclient import TestClient
from sqlalchemy import event, func, make_url, select, update

from encoder_worker.queue import claim_batch, renew, settle_expired
from encoder_worker.worker import EncoderWorker
from llmatch.db import db_now, make_engine, transaction
from llmatch.models import ENCODED, FAILED, PENDING, ChangeLogPruned, Dataset, IndexChange, Record
from llmatch.settings import Settings
from service.app import create_app

REPO = Path(__file__).resolve().parent.parent


def _rows(n: int) -> list[tuple[str, dict]]:
    return [(str(i), {"name": f"product number {i} with a short title", "n": i}) for i in range(n)]


def _statuses(factory) -> dict[str, int]:
    with factory() as session:
        return dict(session.execute(select(Record.status, func.count()).group_by(Record.status)).all())


def _send(client: TestClient, method: str, url: str, body: dict):
    """JSON as a client escapes it (``\\ud800``): httpx itself cannot encode a lone surrogate."""
    return client.request(method, url, content=json.dumps(body), headers={"content-type": "application/json"})


def _factory(client: TestClient):
    return client.app.state.service.session_factory


# ------------------------------------------------------------------------------------------ bad characters


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"id": "x", "attributes": {"name": "bad \ud800 text"}}, "attribute 'name'"),
        ({"id": "x", "attributes": {"na\ud800me": "text"}}, "attribute name"),
        ({"id": "x\x00y", "attributes": {"name": "text"}}, "record id"),
        ({"id": "x", "attributes": {"na\x00me": "text"}}, "attribute name"),
        ({"id": "x", "attributes": {"name": "nul \x00 inside"}}, "attribute 'name'"),
    ],
)
def test_unstorable_text_in_records_is_a_422_naming_the_field(client, record, field):
    client.put("/datasets/shop", json={})
    response = _send(client, "POST", "/records", {"dataset": "shop", "source": "a", "records": [record]})
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]
    assert _statuses(_factory(client)) == {}


def test_unstorable_text_inline_and_in_paths_is_a_422(products, client):
    inline = {"dataset": products, "record": {"attributes": {"name": "\udfff"}}}
    response = _send(client, "POST", "/candidates", inline)
    assert response.status_code == 422 and "surrogate" in response.json()["detail"]
    assert client.get("/records/shop/a/bad%00id").status_code == 422
    query = "dataset=shop&left_source=a&left_id=a%00&right_source=b&right_id=b1"
    assert client.get(f"/match?{query}").status_code == 422
    assert _send(client, "PUT", "/datasets/shop", {"instruction": "x\ud800"}).status_code == 422


# ------------------------------------------------------------------------------- SQLite readers and writers


def test_sqlite_reads_do_not_wait_for_a_writer(sqlite_url, tmp_path, counting_pool):
    settings = Settings(database_url=sqlite_url, data_dir=tmp_path / "data", device="cpu")
    with TestClient(create_app(settings, pool=counting_pool, run_worker=False), base_url="http://localhost") as api:
        api.put("/datasets/shop", json={})
        writer = sqlite3.connect(make_url(sqlite_url).database, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            answers: list[int] = []
            reader = threading.Thread(target=lambda: answers.append(api.get("/datasets/shop").status_code))
            reader.start()
            reader.join(timeout=10)
            assert answers == [200], "a read waited for the write lock"
        finally:
            writer.execute("ROLLBACK")
            writer.close()


class ConnectionWatchingPool(CountingPool):
    """The real pool, noting whether the thread that encodes holds a database connection meanwhile."""

    holders: dict[int, int] = {}  # connection -> thread that checked it out
    held: list[bool] = []

    def watch(self, engine) -> None:
        event.listen(engine, "checkout", lambda conn, _rec, _proxy: self.holders.update({id(conn): get_ident()}))
        event.listen(engine, "checkin", lambda conn, _rec: self.holders.pop(id(conn), None))

    def encode(self, name, inputs):
        self.held.append(get_ident() in self.holders.values())
        return super().encode(name, inputs)


def test_sixteen_concurrent_requests_reuse_their_connections(client):
    state = client.app.state.service
    state.synchronizer.stop_event.set()  # the background threads (index and entity followers) use the pool too
    for thread in state.threads:
        thread.join(timeout=30)
    engine = state.engine
    opened = []
    event.listen(engine, "connect", lambda conn, _record: opened.append(conn))
    engine.dispose()  # start from an empty pool
    for _ in range(3):  # 16 at once, three times: the pool keeps them, nothing is opened again
        held = [engine.connect() for _ in range(16)]
        for connection in held:
            connection.close()
    assert len(opened) == 16


def test_no_database_connection_is_held_while_encoding_inline(products, settings, counting_pool):
    pool = ConnectionWatchingPool(counting_pool)
    pool.holders, pool.held = {}, []
    with TestClient(create_app(settings, pool=pool, run_worker=False), base_url="http://localhost") as api:
        pool.watch(api.app.state.service.engine)
        inline = {"attributes": {"name": "a brand new gadget nobody stored"}}
        assert api.post("/candidates", json={"dataset": products, "record": inline}).status_code == 200
        body = {"dataset": products, "left": inline, "right": {"source": "b", "id": "b1"}}
        assert api.post("/match", json=body).status_code == 200
    assert pool.held == [False, False]


# ---------------------------------------------------------------------------------- workers that die


class Crash(BaseException):
    """Stands for the process dying inside the encoder (nothing after it runs, no cleanup reaches the DB)."""


class CrashingOn(CountingPool):
    """The real pool, 'dying' whenever a batch contains a marker text."""

    marker = "POISON"

    def encode(self, name, inputs):
        if any(self.marker in item.text for item in inputs):
            raise Crash
        return super().encode(name, inputs)


def _expire_leases(factory) -> None:
    """End every lease now: a second ago, so that a claim in the same millisecond (SQLite's clock resolution)
    already finds them expired."""
    with transaction(factory) as session:
        past = db_now(session) - timedelta(seconds=1)
        session.execute(update(Record).where(Record.claim_token.is_not(None)).values(lease_until=past))


def test_a_record_that_kills_its_worker_fails_alone_and_spares_the_others(client, settings, counting_pool):
    client.put("/datasets/shop", json={})
    rows = _rows(20) + [("bad", {"name": "POISON pill"})]
    client.post("/records", json=records_body("shop", "a", rows))
    factory = _factory(client)
    settings = settings.model_copy(update={"worker_commit_size": 8, "worker_max_attempts": 3})
    deaths = 0
    for _ in range(10):  # each death is followed by a new worker once the lease has run out
        worker = EncoderWorker(factory, CrashingOn(counting_pool), settings)
        try:
            if worker.run_once().claimed == 0:
                break
        except Crash:
            deaths += 1
        finally:
            worker.close()  # its heartbeat stops: a dead process renews no lease
        _expire_leases(factory)
    with factory() as session:
        state = session.execute(
            select(Record.external_id, Record.status, Record.claim_token, Record.lease_until, Record.attempts).where(
                Record.status != ENCODED
            )
        ).all()
    assert _statuses(factory) == {ENCODED: 20, FAILED: 1}, f"after {deaths} deaths: {state}"
    assert deaths == 4, "one death in its group (of five: next alone), then three alone"
    bad = client.get("/records/shop/a/bad").json()
    assert bad["status"] == "failed" and "died 3 times" in bad["error"]
    with factory() as session:
        assert set(session.scalars(select(Record.attempts).where(Record.external_id != "bad"))) == {0}


def test_a_worker_killed_mid_batch_keeps_what_it_stored(client, settings, counting_pool):
    client.put("/datasets/shop", json={})
    longest = {"name": "POISON " + "and a very long description " * 10}  # encoded last: batches go by length
    client.post("/records", json=records_body("shop", "a", _rows(40) + [("z", longest)]))
    factory = _factory(client)
    settings = settings.model_copy(update={"worker_batch_size": 64, "worker_commit_size": 8})
    with pytest.raises(Crash):
        EncoderWorker(factory, CrashingOn(counting_pool), settings).run_once()
    assert _statuses(factory) == {ENCODED: 40, PENDING: 1}, "finished encoder batches were stored"


def test_a_worker_that_dies_after_its_encoder_returned_blames_no_record(client, settings, counting_pool, monkeypatch):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(3)))
    factory = _factory(client)
    settings = settings.model_copy(update={"worker_commit_size": 1, "worker_max_attempts": 3})  # each one alone
    for _ in range(3):  # three deaths between the encoder's answer and the store: an outside kill, not the record
        worker = EncoderWorker(factory, counting_pool, settings)
        monkeypatch.setattr(worker, "_store", lambda *args: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            worker.run_once()
        _expire_leases(factory)
    with transaction(factory) as session:
        assert settle_expired(session, max_attempts=3) == 3
    with factory() as session:
        assert set(session.execute(select(Record.attempts, Record.batch_limit)).all()) == {(0, None)}
    make_worker(settings, counting_pool).drain()
    assert _statuses(factory) == {ENCODED: 3}


def test_a_lease_renewal_skips_rows_being_stored_instead_of_waiting(pg_url, tmp_path, counting_pool):
    """On PostgreSQL the heartbeat's renewal and the worker's own store could lock a claim's rows in opposite
    orders and deadlock; a renewal that never waits for a row lock cannot be part of a deadlock."""
    settings = Settings(database_url=pg_url, data_dir=tmp_path, device="cpu")
    with TestClient(create_app(settings, pool=counting_pool, run_worker=False), base_url="http://localhost") as api:
        api.put("/datasets/shop", json={})
        api.post("/records", json=records_body("shop", "a", _rows(4)))
        factory = _factory(api)
        claim = claim_batch(factory, 10, 60)
        locked = min(r.record_id for r in claim.records)

        def renew_claim() -> int:
            with transaction(factory) as session:
                return renew(session, claim.token, 60)

        with ThreadPoolExecutor(max_workers=1) as pool, transaction(factory) as store:
            store.execute(update(Record).where(Record.id == locked).values(inflight_batch=0))  # a store in progress
            assert pool.submit(renew_claim).result(timeout=10) == len(claim.records) - 1


def test_a_live_worker_keeps_its_claim_past_the_lease(client, settings, counting_pool):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(4)))
    factory = _factory(client)
    settings = settings.model_copy(update={"worker_lease_seconds": 1.0})

    class Slow(CountingPool):
        def encode(self, name, inputs):
            time.sleep(2.5)
            return super().encode(name, inputs)

    slow = EncoderWorker(factory, Slow(counting_pool), settings)
    thread = threading.Thread(target=slow.run_once)
    thread.start()
    time.sleep(1.8)  # past the lease: only the heartbeat keeps the claim
    stolen = EncoderWorker(factory, counting_pool, settings).run_once()
    thread.join()
    assert stolen.claimed == 0
    assert _statuses(factory) == {ENCODED: 4}


# ------------------------------------------------------------------------------------ encoder outages


class Down(CountingPool):
    """The real pool behind a switch: while down, every call fails (the model folder is gone, CUDA error)."""

    down = True

    def encode(self, name, inputs):
        if self.down:
            raise RuntimeError("CUDA error: device unavailable")
        return super().encode(name, inputs)


def test_an_encoder_outage_spends_no_attempts(client, settings, counting_pool):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(5)))
    factory = _factory(client)
    pool = Down(counting_pool)
    worker = EncoderWorker(factory, pool, settings.model_copy(update={"worker_max_attempts": 1}))
    for _ in range(5):
        worker.run_once()
        with transaction(factory) as session:  # skip the back-off delay
            session.execute(update(Record).values(lease_until=None))
    assert _statuses(factory) == {PENDING: 5}
    assert "encoder unavailable" in client.get("/records/shop/a/0").json()["error"]
    with factory() as session:
        assert set(session.scalars(select(Record.attempts))) == {0}
    pool.down = False
    worker.drain()
    assert _statuses(factory) == {ENCODED: 5}


def test_failed_records_can_be_requeued(client, settings, counting_pool, drain):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(3)))
    factory = _factory(client)
    with transaction(factory) as session:
        session.execute(update(Record).values(status=FAILED, attempts=3, error="boom"))
    failed = client.get("/records/shop/a/0").json()
    assert failed["status"] == "failed" and failed["error"] == "boom"
    response = client.post("/datasets/shop/requeue", json={"status": "failed"})
    assert response.status_code == 200 and response.json() == {"requeued": 3}
    assert client.post("/datasets/shop/requeue", json={"status": "encoded"}).status_code == 422
    assert client.post("/datasets/nope/requeue", json={"status": "failed"}).status_code == 404
    drain()
    assert _statuses(factory) == {ENCODED: 3}


def test_requeue_command(client, settings):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(2)))
    with transaction(_factory(client)) as session:
        session.execute(update(Record).values(status=FAILED, attempts=3, error="boom"))
    env = {"LLMATCH_DATABASE_URL": settings.resolved_database_url, "LLMATCH_DATA_DIR": str(settings.data_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "llmatch.cli", "requeue", "shop"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "requeued 2" in done.stdout
    assert _statuses(_factory(client)) == {PENDING: 2}


# ---------------------------------------------------------------------------------- the index follower


def test_a_change_that_commits_late_is_still_applied(products, client, drain):
    """A transaction open for minutes (its entries stamped with its start) commits after the follower read past
    them: the follower must still apply them."""
    state = client.app.state.service
    factory = state.session_factory
    with factory() as session:
        record = session.scalars(select(Record).where(Record.external_id == "b5")).one()
        key = (record.dataset_id, record.source)
    state.synchronizer.poll()
    with transaction(factory) as session:
        session.execute(update(Record).where(Record.id == record.id).values(status=PENDING, embedding_id=None))
        stamp = db_now(session) - timedelta(minutes=5)
        session.add(IndexChange(dataset_id=key[0], source=key[1], record_id=record.id, created_at=stamp))
    state.synchronizer.poll()
    assert state.registry.embedding_ids(key, np.array([record.id]))[0] == -1, "the late removal was applied"


def test_a_follower_behind_the_pruned_log_reloads(products, client):
    state = client.app.state.service
    with transaction(state.session_factory) as session:
        top = session.scalar(select(func.max(IndexChange.txid))) or 0
        session.add(ChangeLogPruned(id=1, max_id=10**9, max_txid=top + 10**6))
    state.synchronizer.poll()  # (the background follower may get there first)
    reloads = state.synchronizer.reloads
    assert reloads >= 1
    state.synchronizer.poll()
    state.synchronizer.poll()
    assert state.synchronizer.reloads == reloads, "once reloaded, the follower goes on from there"


def test_candidates_never_serve_a_record_that_is_not_encoded_in_the_dataset(products, client):
    state = client.app.state.service
    with transaction(state.session_factory) as session:
        session.execute(update(Record).where(Record.external_id == "b1").values(status=PENDING, embedding_id=None))
    # the follower has not applied anything yet: the index still holds b1
    query = client.get("/candidates?dataset=shop&source=a&id=a1&k=5").json()["candidates"]
    assert "b1" not in {c["id"] for c in query}
    assert len(query) == 4


# ---------------------------------------------------------------------------------------- SQLite storage


def test_sqlite_never_reuses_a_deleted_highest_id(client, database_url):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", PRODUCTS_A))
    factory = _factory(client)
    with factory() as session:
        highest = session.scalar(select(func.max(Record.id)))
    assert client.delete("/records/shop/a/a4").status_code == 204
    client.post("/records", json=records_body("shop", "a", [("a5", {"name": "new"})]))
    with factory() as session:
        assert session.scalar(select(Record.id).where(Record.external_id == "a5")) > highest
        dataset_id = session.scalar(select(Dataset.id))
    client.delete("/datasets/shop")
    client.put("/datasets/shop", json={})
    with factory() as session:
        assert session.scalar(select(Dataset.id)) > dataset_id


def test_sqlite_commits_are_durable(sqlite_url):
    with make_engine(sqlite_url).connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_a_fresh_embedded_store_creates_itself(tmp_path, counting_pool):
    settings = Settings(data_dir=tmp_path / "new", device="cpu")
    with TestClient(create_app(settings, pool=counting_pool, run_worker=False), base_url="http://localhost") as api:
        assert api.put("/datasets/shop", json={}).status_code == 201


def test_a_store_behind_on_migrations_or_on_postgresql_is_refused(tmp_path):
    from alembic import command

    from llmatch.migrate import alembic_config

    old = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    with make_engine(old).begin() as connection:
        config = alembic_config(old)
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    with empty_pg_database("llmatch_empty") as pg:
        for database_url in (old, pg):
            env = {"LLMATCH_DATABASE_URL": database_url, "LLMATCH_DATA_DIR": str(tmp_path)}
            done = subprocess.run(
                [sys.executable, "-m", "llmatch.cli", "worker", "--drain"],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
            )
            assert done.returncode == 2 and "llmatch migrate" in done.stderr, done.stderr


def test_worker_settles_expired_claims_at_claim_time(client, settings, counting_pool):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(3)))
    factory = _factory(client)
    with transaction(factory) as session:
        past = db_now(session) - timedelta(seconds=5)
        values = {"claim_token": "dead", "lease_until": past, "inflight_batch": 1}
        session.execute(update(Record).where(Record.external_id == "0").values(attempts=2, **values))
        session.execute(update(Record).where(Record.external_id == "1").values(**{**values, "inflight_batch": 3}))
    make_worker(settings, counting_pool).drain()
    assert client.get("/records/shop/a/0").json()["status"] == "failed"
    assert client.get("/records/shop/a/1").json()["status"] == "encoded"
    assert client.get("/records/shop/a/2").json()["status"] == "encoded"


def test_a_group_that_died_is_split_by_four(client, settings):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(3)))
    factory = _factory(client)
    with transaction(factory) as session:
        past = db_now(session) - timedelta(seconds=5)
        for rid, group in (("0", 64), ("1", 9), ("2", 7)):
            values = {"claim_token": "dead", "lease_until": past, "inflight_batch": group}
            session.execute(update(Record).where(Record.external_id == rid).values(**values))
    with transaction(factory) as session:
        assert settle_expired(session, max_attempts=3) == 3
    with factory() as session:
        limits = dict(session.execute(select(Record.external_id, Record.batch_limit)).all())
        assert set(session.scalars(select(Record.attempts))) == {0}, "a death in a group blames no one"
    assert limits == {"0": 16, "1": 2, "2": 1}
