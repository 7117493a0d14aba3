"""An encoder name remapped to another configuration: at start-up, vectors made by the old one go back to the
queue and a calibration fitted under it is no longer applied; on SQLite and PostgreSQL with the real MiniLM."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from encoder_worker.worker import EncoderWorker
from llmatch.db import transaction
from llmatch.models import Calibration, Embedding, Record
from service.app import create_app

PAIRS = [
    {"left_source": "a", "left_id": a, "right_source": "b", "right_id": b, "label": y}
    for a, b, y in [("a1", "b1", 1), ("a2", "b2", 1), ("a1", "b2", 0), ("a2", "b1", 0)]
]


def status(client, source: str, record_id: str) -> str:
    return client.get(f"/records/shop/{source}/{record_id}").json()["status"]


def test_vectors_and_calibration_of_another_encoder_configuration_are_not_used(
    products, client, settings, counting_pool, caplog
):
    assert client.post("/datasets/shop/calibrate", json={"pairs": PAIRS}).status_code == 200
    state = client.app.state.service
    current_key = counting_pool.spec("minilm").key
    with transaction(state.session_factory) as session:  # as if a1 and b1 were encoded before a remap of "minilm"
        old = select(Record.embedding_id).where(Record.external_id.in_(["a1", "b1"]))
        session.execute(update(Embedding).where(Embedding.id.in_(old)).values(encoder_key="before-the-remap"))
        session.execute(update(Calibration).values(encoder_key="before-the-remap"))

    caplog.set_level(logging.WARNING, logger="llmatch.index")
    restarted = TestClient(create_app(settings, pool=counting_pool, run_worker=False), base_url="http://localhost")
    with restarted:
        assert status(restarted, "a", "a1") == status(restarted, "b", "b1") == "pending"
        assert status(restarted, "a", "a2") == status(restarted, "b", "b2") == "encoded"
        assert restarted.get("/datasets/shop").json()["calibration"] is None
        answer = restarted.get(
            "/match", params=dict(dataset="shop", left_source="a", left_id="a2", right_source="b", right_id="b2")
        ).json()
        assert answer["threshold"] is None and answer["match"] is None
        candidates = restarted.get("/candidates", params=dict(dataset="shop", source="a", id="a2", k=10)).json()
        assert "b1" not in {c["id"] for c in candidates["candidates"]}
        messages = " ".join(record.getMessage() for record in caplog.records)
        assert "2 records had vectors of another encoder configuration" in messages
        assert "calibration was fitted under encoder configuration before-the-remap" in messages

        service = restarted.app.state.service
        EncoderWorker(service.session_factory, counting_pool, settings).drain()
        assert status(restarted, "a", "a1") == "encoded"
        with service.session_factory() as session:
            keys = set(session.scalars(select(Embedding.encoder_key).join(Record, Record.embedding_id == Embedding.id)))
        assert keys == {current_key}


def test_a_start_with_the_same_configuration_changes_nothing(products, client, settings, counting_pool):
    assert client.post("/datasets/shop/calibrate", json={"pairs": PAIRS}).status_code == 200
    with TestClient(
        create_app(settings, pool=counting_pool, run_worker=False), base_url="http://localhost"
    ) as restarted:
        assert restarted.get("/datasets/shop").json()["calibration"] is not None
        assert {status(restarted, "a", f"a{i}") for i in range(1, 5)} == {"encoded"}
