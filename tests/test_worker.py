"""The encoder worker: content cache, failures, crash safety and concurrent workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import CountingPool, make_worker, records_body
from sqlalchemy import func, select

from encoder_worker.worker import EncoderWorker
from llmatch.db import make_engine, make_session_factory
from llmatch.models import ENCODED, FAILED, PENDING, Embedding, Record

REPO = Path(__file__).resolve().parent.parent


def _counts(session_factory) -> dict[str, int]:
    with session_factory() as session:
        rows = session.execute(select(Record.status, func.count()).group_by(Record.status)).all()
    return dict(rows)


def _rows(n: int, prefix: str = "item") -> list[tuple[str, dict]]:
    words = ["red", "green", "blue", "steel", "cotton", "wireless", "compact", "pro", "ultra", "mini"]
    return [(str(i), {"name": f"{prefix} {i} {words[i % 10]} {words[(i * 7) % 10]}", "n": i}) for i in range(n)]


def test_worker_encodes_and_marks_records(client, drain):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(40)))
    drain()
    assert _counts(client.app.state.service.session_factory) == {ENCODED: 40}


def test_identical_texts_are_encoded_once(client, drain, counting_pool):
    client.put("/datasets/shop", json={})
    client.put("/datasets/shop2", json={})
    same = [("1", {"name": "sony tv"}), ("2", {"name": "sony tv"}), ("3", {"name": "lg tv"})]
    client.post("/records", json=records_body("shop", "a", same))
    client.post("/records", json=records_body("shop2", "x", same))
    drain()
    assert sorted(call.text for call in counting_pool.calls) == ["[name] lg tv [\\name]", "[name] sony tv [\\name]"]
    with client.app.state.service.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Embedding)) == 2


def test_changing_back_encodes_again(products, client, drain, counting_pool):
    """Re-queued records take their old vectors with them (tests/test_claims.py): no cache outlives them."""
    client.put("/datasets/shop", json={"serialization": "plain"})
    drain()
    calls = len(counting_pool.calls)
    client.put("/datasets/shop", json={"serialization": "tagged"})
    drain()
    assert len(counting_pool.calls) == calls + 9
    assert _counts(client.app.state.service.session_factory) == {ENCODED: 9}


class FailingOn:
    """An encoder collaborator that fails on texts containing a marker and delegates the rest."""

    def __init__(self, inner: CountingPool, marker: str):
        self.inner, self.marker = inner, marker
        self.specs, self.max_text_chars = inner.specs, inner.max_text_chars

    def spec(self, name):
        return self.inner.spec(name)

    def encode(self, name, inputs):
        if any(self.marker in item.text for item in inputs):
            raise RuntimeError("cannot encode this text")
        return self.inner.encode(name, inputs)


def test_a_failing_record_does_not_fail_its_batch(client, settings, counting_pool):
    client.put("/datasets/shop", json={})
    rows = _rows(10) + [("bad", {"name": "POISON"})]
    client.post("/records", json=records_body("shop", "a", rows))
    settings = settings.model_copy(update={"worker_max_attempts": 2})
    worker = EncoderWorker(client.app.state.service.session_factory, FailingOn(counting_pool, "POISON"), settings)
    worker.drain()
    factory = client.app.state.service.session_factory
    assert _counts(factory) == {ENCODED: 10, PENDING: 1}
    with factory() as session:
        session.execute(Record.__table__.update().values(lease_until=None))  # skip the retry delay
        session.commit()
    worker.drain()
    assert _counts(factory) == {ENCODED: 10, FAILED: 1}
    record = client.get("/records/shop/a/bad").json()
    assert record["status"] == "failed" and "cannot encode this text" in record["error"]


def test_unavailable_encoder_gives_records_back(client, settings, counting_pool, tmp_path):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(3)))
    factory = client.app.state.service.session_factory
    broken = CountingPool(counting_pool)
    broken.specs = dict(broken.specs)
    from dataclasses import replace

    broken.specs["minilm"] = replace(broken.specs["minilm"], model=str(tmp_path / "missing"))
    broken._loaded = {}
    EncoderWorker(factory, broken, settings).drain()
    assert _counts(factory) == {PENDING: 3}
    assert "does not exist" in client.get("/records/shop/a/0").json()["error"]


def _worker_env(settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LLMATCH_DATABASE_URL=settings.resolved_database_url,
        LLMATCH_DATA_DIR=str(settings.data_dir),
        LLMATCH_DEVICE="cpu",
        HF_HUB_OFFLINE="1",
        LLMATCH_LOG_LEVEL="INFO",
        **extra,
    )
    return env


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_worker_killed_mid_batch_loses_and_duplicates_nothing(client, settings, counting_pool):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", _rows(300, prefix="a long product title")))
    factory = client.app.state.service.session_factory
    env = _worker_env(settings, LLMATCH_WORKER_BATCH_SIZE="256", LLMATCH_WORKER_LEASE_SECONDS="3")
    process = subprocess.Popen(
        [sys.executable, "-m", "llmatch.cli", "worker"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the parent and the encoding process it forked
    )

    def claimed() -> bool:
        with factory() as session:
            return bool(session.scalar(select(func.count()).where(Record.claim_token.is_not(None))))

    try:
        _wait_for(claimed, 120, "the worker to claim a batch")
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # both processes, as when the machine or container goes
        process.wait()
    counts = _counts(factory)
    assert counts.get(PENDING, 0) >= 256, f"killed before finishing its first batch: {counts}"
    encoded_before = counts.get(ENCODED, 0)
    calls_before = len(counting_pool.calls)

    time.sleep(3.1)  # the dead worker's lease runs out
    make_worker(settings, counting_pool).drain()
    assert _counts(factory) == {ENCODED: 300}
    assert len(counting_pool.calls) - calls_before == 300 - encoded_before, "only unfinished records re-encoded"
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Embedding)) == 300
        stuck = session.scalar(select(func.count()).where(Record.claim_token.is_not(None)))
        assert stuck == 0


def test_concurrent_workers_claim_disjoint_batches(pg_url, tmp_path, counting_pool):
    from conftest import Settings

    settings = Settings(database_url=pg_url, data_dir=tmp_path, worker_batch_size=8, worker_poll_seconds=0.01)
    factory = make_session_factory(make_engine(pg_url))
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(settings, pool=counting_pool, run_worker=False), base_url="http://localhost") as api:
        api.put("/datasets/shop", json={})
        api.post("/records", json=records_body("shop", "a", _rows(400)))
    workers = [make_worker(settings, counting_pool) for _ in range(4)]
    threads = [threading.Thread(target=w.drain) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _counts(factory) == {ENCODED: 400}
    with factory() as session:
        attempts = session.scalars(select(Record.attempts).distinct()).all()
    assert attempts == [0], "no record spent an attempt"
    assert len(counting_pool.calls) == 400 and len({c.text for c in counting_pool.calls}) == 400


@pytest.mark.parametrize("workers", [2])
def test_concurrent_worker_processes_on_postgres(pg_url, tmp_path, counting_pool, workers):
    from conftest import Settings
    from fastapi.testclient import TestClient

    from service.app import create_app

    settings = Settings(database_url=pg_url, data_dir=tmp_path, worker_batch_size=8)
    with TestClient(create_app(settings, pool=counting_pool, run_worker=False), base_url="http://localhost") as api:
        api.put("/datasets/shop", json={})
        api.post("/records", json=records_body("shop", "a", _rows(300)))
    env = _worker_env(settings, LLMATCH_WORKER_BATCH_SIZE="8")
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "llmatch.cli", "worker", "--drain"],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    logs = [p.communicate(timeout=300)[1] for p in processes]
    assert all(p.returncode == 0 for p in processes), logs
    factory = make_session_factory(make_engine(pg_url))
    assert _counts(factory) == {ENCODED: 300}
    with factory() as session:
        assert session.scalars(select(Record.attempts).distinct()).all() == [0]
        assert session.scalar(select(func.count()).select_from(Embedding)) == 300
    drained = [int(re.search(r"drained: encoded (\d+) records", log).group(1)) for log in logs]
    assert sum(drained) == 300, f"each record encoded by exactly one process: {drained}"
