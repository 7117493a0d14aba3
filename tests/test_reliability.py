"""Health under load and faults, and CI-sized runs of the fault-injection harness (``bench/reliability``):
real ``llmatch serve`` / ``llmatch worker`` processes SIGKILLed, their index files damaged, loaded."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench.reliability import api_faults, data, index_faults, load, worker_faults
from encoding.encoder import EncoderInput
from encoding.registry import EncoderPool
from service.app import create_app
from tests.live_server import live_server

# ---------------------------------------------------------------------------------------------- health


class HeldPool(EncoderPool):
    """The real pool, whose encodes wait until ``release`` is set (an encoder busy for as long as a test needs)."""

    def __init__(self, inner: EncoderPool):
        self.__dict__.update(inner.__dict__)
        self.specs, self._locks = dict(inner.specs), dict(inner._locks)
        self.release = threading.Event()
        self.waiting = 0

    def encode(self, name: str, inputs: Sequence[EncoderInput]) -> np.ndarray:
        self.waiting += 1
        self.release.wait(timeout=120)
        return super().encode(name, inputs)


def test_health_answers_while_inline_encodes_hold_every_thread(products, settings, pool):
    """48 inline POST /candidates stuck in the encoder take every worker thread of the server; /healthz and
    /readyz still answer at once (a sync route would queue behind them)."""
    held = HeldPool(pool)
    busy = settings.model_copy(update={"max_inline_encodes": 64})
    app = create_app(busy, pool=held, run_worker=False)
    with live_server(app) as (url, _):
        body = {"dataset": "shop", "record": {"attributes": {"name": "sony tv"}}, "k": 1}
        post = {"json": body, "timeout": 120}
        senders = [threading.Thread(target=httpx.post, args=(f"{url}/candidates",), kwargs=post) for _ in range(48)]
        for sender in senders:
            sender.start()
        try:
            deadline = time.monotonic() + 30
            while held.waiting < 40 and time.monotonic() < deadline:  # the thread pool holds 40
                time.sleep(0.05)
            assert held.waiting >= 40
            started = time.monotonic()
            assert httpx.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}
            ready = httpx.get(f"{url}/readyz", timeout=5)
            assert ready.status_code == 200, ready.text
            assert time.monotonic() - started < 3
        finally:
            held.release.set()
            for sender in senders:
                sender.join(timeout=120)


def test_readyz_names_a_dead_follower_and_a_dead_worker(settings, counting_pool):
    with TestClient(create_app(settings, pool=counting_pool, run_worker=True), base_url="http://localhost") as client:
        state = client.app.state.service
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["encoder_worker"] == {"alive": True}
        assert ready["index_follower"]["alive"] and ready["index_follower"]["lag_seconds"] < 5

        state.worker.stop()
        next(t for t in state.threads if t.name == "encoder-worker").join(timeout=30)
        answer = client.get("/readyz")
        assert answer.status_code == 503 and "encoder worker" in answer.json()["detail"]
        assert answer.json()["encoder_worker"] == {"alive": False}

        state.synchronizer.stop_event.set()
        next(t for t in state.threads if t.name == "index-sync").join(timeout=30)
        answer = client.get("/readyz")
        assert answer.status_code == 503 and "index follower thread" in answer.json()["detail"]


def test_readyz_reports_follower_lag(settings, counting_pool, monkeypatch):
    """A follower whose polls keep failing is alive but stale: /readyz says so once the lag passes the limit."""
    lagging = settings.model_copy(update={"index_max_lag_seconds": 1.0})
    with TestClient(create_app(lagging, pool=counting_pool, run_worker=False), base_url="http://localhost") as client:
        synchronizer = client.app.state.service.synchronizer
        assert client.get("/readyz").status_code == 200

        def broken() -> int:
            raise RuntimeError("database went away")

        monkeypatch.setattr(synchronizer, "poll", broken)
        time.sleep(1.5)
        answer = client.get("/readyz")
        assert answer.status_code == 503, answer.text
        assert answer.json()["index_follower"]["lag_seconds"] > 1.0
        assert "has not applied the change log" in answer.json()["detail"]


def test_readyz_does_not_wait_for_a_hung_database(settings, counting_pool, monkeypatch):
    quick = settings.model_copy(update={"ready_timeout_seconds": 0.5})
    with TestClient(create_app(quick, pool=counting_pool, run_worker=False), base_url="http://localhost") as client:
        state = client.app.state.service
        monkeypatch.setattr(state, "database_ok", lambda: time.sleep(5) or True)
        started = time.monotonic()
        answer = client.get("/readyz")
        assert time.monotonic() - started < 3
        assert answer.status_code == 503 and "database unavailable" in answer.json()["detail"]


# ---------------------------------------------------------------------------------------------- harness, CI-sized


@pytest.fixture(scope="module")
def items() -> list[data.Record]:
    return data.records(150)


def test_killed_workers_lose_and_fail_nothing(items):
    """Two ``llmatch worker`` processes on PostgreSQL, two SIGKILLs while they drain."""
    run = worker_faults.drain(
        items, workers=2, kills=2, lease_seconds=3, kill_every=(0.2, 1.0), batch_size=32, policy="eager"
    )
    assert run.kills == 2
    assert (run.lost, run.failed, run.pending) == (0, 0, 0)
    assert run.encoded == len(items)


def test_kill_intervals_are_given_as_low_high_seconds():
    from bench.reliability.__main__ import seconds_range

    assert seconds_range("2-6") == (2.0, 6.0)
    assert seconds_range("0.5-2") == (0.5, 2.0)
    for wrong in ("6-2", "0-1", "x-2"):
        with pytest.raises(ValueError):
            seconds_range(wrong)


def test_killed_server_keeps_every_acknowledged_record(items):
    """``llmatch serve`` SIGKILLed twice during concurrent ingestion: every 202 is stored and encoded."""
    run = api_faults.run(items, kills=2, clients=3, batch=10, uptime=(0.5, 1.5))
    assert run["acknowledged"] == len(items)
    assert run["missing"] == run["content_differs"] == run["answers_5xx"] == 0
    assert run["encoded"] == len(items)


def test_damaged_index_files_are_rebuilt_without_encoding(items):
    runs = index_faults.run(items, probes=20)
    assert [r["mode"] for r in runs] == list(index_faults.MODES)
    for run in runs:
        assert run["same_answers"] == run["queries"] == 20, run
        assert run["encoder_calls"] == 0, run
    assert all(r["files_touched"] > 0 for r in runs if r["mode"] != "sigkill")


@pytest.mark.parametrize("backend", ["sqlite", "pg"])
def test_concurrent_reads_beside_writes_have_no_errors(items, backend):
    rows = load.run(items[:100], items[100:], backend=backend, seconds=3, readers=8, inline_clients=2)
    for row in rows:
        assert row["errors"] == 0, row
        assert row["requests"] > 0, row
