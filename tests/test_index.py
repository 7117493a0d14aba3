"""FAISS indexes are derived data: loaded from file when current, else rebuilt from stored vectors, with
no encoder call; and vectors stored by a worker in another process become searchable within a poll."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import CountingPool, records_body
from fastapi.testclient import TestClient
from sqlalchemy import select

from llmatch.models import ENCODED, Record
from matching.index import VectorIndex
from service.app import create_app

REPO = Path(__file__).resolve().parent.parent


class NoEncoding(CountingPool):
    """The real pool with encoding forbidden: proves a code path never calls the encoder."""

    def encode(self, name, inputs):
        raise AssertionError(f"encoder called for {len(inputs)} inputs")


def _candidates(api: TestClient, record_id: str) -> list[tuple[str, float]]:
    response = api.get("/candidates", params=dict(dataset="shop", source="a", id=record_id, k=5))
    assert response.status_code == 200, response.text
    return [(c["id"], round(c["score"], 5)) for c in response.json()["candidates"]]


def _restart(settings, pool) -> TestClient:
    return TestClient(create_app(settings, pool=NoEncoding(pool), run_worker=False), base_url="http://localhost")


def test_restart_loads_saved_index_files(products, client, settings, pool):
    before = _candidates(client, "a1")
    client.app.state.service.registry.save_all()
    with _restart(settings, pool) as api:
        sync = api.app.state.service.synchronizer
        assert sync.rebuilt == [] and len(sync.loaded_from_file) == 2
        assert _candidates(api, "a1") == before


def test_missing_or_corrupt_index_files_are_rebuilt_without_encoding(products, client, settings, pool):
    before = {rid: _candidates(client, rid) for rid in ("a1", "a2", "a3")}
    registry = client.app.state.service.registry
    registry.save_all()
    files = sorted(settings.index_dir.glob("*.faiss"))
    assert len(files) == 2
    files[0].write_bytes(b"not a faiss index")
    files[1].unlink()
    with _restart(settings, pool) as api:
        sync = api.app.state.service.synchronizer
        assert len(sync.rebuilt) == 2 and sync.loaded_from_file == []
        assert {rid: _candidates(api, rid) for rid in before} == before


def test_stale_index_file_is_rebuilt(products, client, settings, pool):
    client.app.state.service.registry.save_all()
    client.delete("/records/shop/b/b1")  # the saved b index still holds b1
    with _restart(settings, pool) as api:
        assert len(api.app.state.service.synchronizer.rebuilt) == 1
        assert "b1" not in {rid for rid, _ in _candidates(api, "a1")}


def test_truncated_manifest_is_rejected(tmp_path):
    index = VectorIndex(4)
    index.upsert(np.array([1, 2]), np.array([10, 20]), np.eye(4, dtype=np.float32)[:2])
    path = tmp_path / "x.faiss"
    index.save(path, {})
    assert VectorIndex.load(path, index.fingerprint()) is not None
    path.with_suffix(".json").write_text('{"fingerprint": ')
    assert VectorIndex.load(path, index.fingerprint()) is None


def test_vector_from_another_process_is_searchable_within_a_second(client, settings):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", [("a1", {"name": "sony bravia tv"})]))
    client.post("/records", json=records_body("shop", "b", [("b1", {"name": "Sony Bravia television"})]))
    env = dict(
        os.environ,
        LLMATCH_DATABASE_URL=settings.resolved_database_url,
        LLMATCH_DATA_DIR=str(settings.data_dir),
        HF_HUB_OFFLINE="1",
        LLMATCH_DEVICE="cpu",
    )
    worker = subprocess.run(
        [sys.executable, "-m", "llmatch.cli", "worker", "--drain"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert worker.returncode == 0, worker.stderr
    with client.app.state.service.session_factory() as session:
        assert set(session.scalars(select(Record.status))) == {ENCODED}
    encoded_seen = time.monotonic()
    while not client.get("/candidates", params=dict(dataset="shop", source="a", id="a1")).json().get("candidates"):
        assert time.monotonic() - encoded_seen < 2.0, "not searchable within the sync interval"
        time.sleep(0.02)
    # the API process followed the log: it never rebuilt an index
    assert client.app.state.service.synchronizer.rebuilt == []
