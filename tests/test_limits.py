"""Bounds one client cannot break: body size, rendered text per record, attribute names per dataset,
concurrent on-the-spot encodes, k. Each refusal is a 4xx that names the limit's setting."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import records_body
from fastapi.testclient import TestClient

from encoder_worker.worker import EncoderWorker
from encoding.encoder import EncoderInput, l2_normalise
from encoding.registry import EncoderSpec
from llmatch.settings import Settings
from service.app import create_app
from service.schemas import MAX_ATTRIBUTES, MAX_VALUE_CHARS

INLINE = {"attributes": {"name": "bose qc 45 headset"}}


class Recorder:
    """A stand-in encoder (the collaborator; the bound under test is the pool's and the API's): records what it
    is given, and can be held inside ``encode`` until released."""

    key = "recorder-v1"
    dim = 8

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def encode(self, inputs: Sequence[EncoderInput], batch_size: int = 32) -> np.ndarray:
        self.texts.extend(item.text for item in inputs)
        self.entered.set()
        assert self.release.wait(30), "never released"
        return l2_normalise(np.ones((len(inputs), self.dim), dtype=np.float32))


@pytest.fixture
def recorder(counting_pool, tmp_path: Path) -> Recorder:
    folder = tmp_path / "recorder-model"
    folder.mkdir()
    encoder = Recorder()
    counting_pool.add(EncoderSpec("recorder", "sentence-transformers", str(folder)), encoder=encoder)
    return encoder


def limited_client(settings: Settings, pool, **limits) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=limits), pool=pool, run_worker=False), base_url="http://localhost")


def assert_refusal(response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    for fragment in fragments:
        assert fragment in detail, detail
    return detail


# ---------------------------------------------------------------------------------------------- body size


def test_default_body_limit_fits_one_record_at_the_contracts_maxima():
    """The default is derived from the contract: one record of 256 attributes of 65,536 characters, each
    character 3 bytes in UTF-8 (any character of the Basic Multilingual Plane), must fit; 256 MiB is gone."""
    value = "€" * MAX_VALUE_CHARS  # 3 bytes in UTF-8
    record = {"id": "x" * 256, "attributes": {f"{i:0>256}": value for i in range(MAX_ATTRIBUTES)}}
    body = json.dumps({"dataset": "d" * 64, "source": "s" * 64, "records": [record]}, ensure_ascii=False).encode()
    limit = Settings().max_body_bytes
    assert len(body) <= limit < 256 * 1024 * 1024, (len(body), limit)


def test_body_over_the_limit_names_the_setting(settings, counting_pool):
    with limited_client(settings, counting_pool, max_body_bytes=4096) as client:
        client.put("/datasets/shop", json={})
        big = records_body("shop", "a", [(str(i), {"name": "x" * 100}) for i in range(50)])
        assert_refusal(client.post("/records", json=big), 413, "4096 bytes", "LLMATCH_MAX_BODY_BYTES")


# --------------------------------------------------------------------------------- rendered text per record


def test_rendered_text_is_cut_before_tokenisation(settings, counting_pool, recorder, drain):
    """Inline and stored records: the encoder never sees more than max_text_chars characters, and a record
    at the contract's maxima (16 million characters) is answered, not a 500."""
    assert counting_pool.max_text_chars == Settings().max_text_chars == 16_384  # the pool reads the setting
    counting_pool.max_text_chars = 1000
    with limited_client(settings, counting_pool) as client:
        assert client.put("/datasets/big", json={"encoder": "recorder", "serialization": "plain"}).status_code == 201
        huge = {f"a{i}": "w" * MAX_VALUE_CHARS for i in range(MAX_ATTRIBUTES)}
        response = client.post("/candidates", json={"dataset": "big", "record": {"attributes": huge}})
        assert response.status_code == 200, response.text
        assert client.post("/records", json=records_body("big", "a", [("r1", huge)])).status_code == 202
        state = client.app.state.service
        EncoderWorker(state.session_factory, counting_pool, settings).drain()
        assert client.get("/records/big/a/r1").json()["status"] == "encoded"
    assert len(recorder.texts) == 2
    assert all(len(text) == 1000 for text in recorder.texts), [len(t) for t in recorder.texts]
    assert recorder.texts[0] == ("w" * MAX_VALUE_CHARS)[:1000]


def test_short_texts_are_not_touched(settings, counting_pool, recorder):
    counting_pool.max_text_chars = 1000
    with limited_client(settings, counting_pool) as client:
        client.put("/datasets/small", json={"encoder": "recorder", "serialization": "plain"})
        assert client.post("/candidates", json={"dataset": "small", "record": INLINE}).status_code == 200
    assert recorder.texts == ["bose qc 45 headset"]


# ------------------------------------------------------------------------------ attribute names per dataset


def test_distinct_attribute_names_per_dataset_are_capped(settings, counting_pool):
    with limited_client(settings, counting_pool, max_dataset_attributes=5) as client:
        client.put("/datasets/wide", json={})
        six = records_body("wide", "a", [("1", {f"c{i}": "v" for i in range(6)})])
        detail = assert_refusal(client.post("/records", json=six), 422, "6 distinct", "LLMATCH_MAX_DATASET_ATTRIBUTES")
        assert "5" in detail
        assert client.get("/datasets/wide").json()["totals"]["total"] == 0, "a refused batch stored records"
        four = records_body("wide", "a", [("1", {f"c{i}": "v" for i in range(4)})])
        assert client.post("/records", json=four).status_code == 202
        # Known names cost nothing; one new name is fine, a second one is over.
        again = records_body("wide", "a", [("2", {"c0": "v", "c4": "v"})])
        assert client.post("/records", json=again).status_code == 202
        over = records_body("wide", "b", [("3", {"c0": "v", "c5": "v"})])
        assert_refusal(client.post("/records", json=over), 422, "LLMATCH_MAX_DATASET_ATTRIBUTES")
        assert client.get("/datasets/wide").json()["seen_attributes"] == ["c0", "c1", "c2", "c3", "c4"]


# ------------------------------------------------------------------------------------- sources per dataset


def test_sources_per_dataset_are_capped(settings, counting_pool):
    with limited_client(settings, counting_pool, max_dataset_sources=3) as client:
        assert client.put("/datasets/many", json={}).status_code == 201
        for source in ("a", "b", "c"):
            body = records_body("many", source, [(f"{source}1", {"name": "v"})])
            assert client.post("/records", json=body).status_code == 202
        fourth = records_body("many", "d", [("d1", {"name": "v"})])
        detail = assert_refusal(client.post("/records", json=fourth), 422, "LLMATCH_MAX_DATASET_SOURCES", "'d'")
        assert "3" in detail
        assert set(client.get("/datasets/many").json()["records"]) == {"a", "b", "c"}, "a refused batch was stored"
        # Known sources take more records; a source emptied by deletion frees its place.
        more = records_body("many", "c", [("c2", {"name": "w"})])
        assert client.post("/records", json=more).status_code == 202
        assert client.delete("/records/many/a/a1").status_code == 204
        assert client.post("/records", json=fourth).status_code == 202
        assert set(client.get("/datasets/many").json()["records"]) == {"b", "c", "d"}


def test_labels_per_dataset_are_capped_and_relabelling_does_not_count(settings, counting_pool):
    def pair(left: str, right: str, label: int) -> dict:
        return {"left_source": "a", "left_id": left, "right_source": "b", "right_id": right, "label": label}

    with limited_client(settings, counting_pool, max_dataset_labels=3) as client:
        assert client.put("/datasets/labelled", json={}).status_code == 201
        url = "/datasets/labelled/labels"
        assert client.put(url, json={"pairs": [pair("1", "1", 1), pair("2", "2", 0)]}).json()["total"] == 2
        assert client.put(url, json={"pairs": [pair("1", "1", 0), pair("3", "3", 1)]}).json()["total"] == 3
        too_many = {"pairs": [pair("2", "2", 1), pair("4", "4", 1)]}
        detail = assert_refusal(client.put(url, json=too_many), 422, "LLMATCH_MAX_DATASET_LABELS", "3")
        assert "adds 1" in detail
        stored = client.get(url).json()
        assert stored["total"] == 3 and {(p["left_id"], p["label"]) for p in stored["pairs"]} == {
            ("1", 0),
            ("2", 0),  # the refused request stored nothing, its relabel included
            ("3", 1),
        }
        mirrored = {"left_source": "b", "left_id": "3", "right_source": "a", "right_id": "3", "label": 0}
        assert client.put(url, json={"pairs": [mirrored]}).json()["total"] == 3
        assert client.delete(url).status_code == 204
        assert client.put(url, json=too_many).json()["total"] == 2


# ------------------------------------------------------------------------------- concurrent inline encodes


def test_concurrent_inline_encodes_past_the_bound_get_429(settings, counting_pool, recorder, products):
    with limited_client(settings, counting_pool, max_inline_encodes=1) as client:
        client.put("/datasets/slow", json={"encoder": "recorder"})
        recorder.release.clear()
        recorder.entered.clear()
        first: dict = {}
        worker = threading.Thread(
            target=lambda: first.update(r=client.post("/candidates", json={"dataset": "slow", "record": INLINE}))
        )
        worker.start()
        try:
            assert recorder.entered.wait(30), "the first encode never started"
            busy = client.post("/match", json={"dataset": "slow", "left": INLINE, "right": INLINE})
            assert_refusal(busy, 429, "LLMATCH_MAX_INLINE_ENCODES", "retry")
            assert busy.headers["retry-after"] == "1"
            # Requests that encode nothing on the spot are not held back.
            refs = {"dataset": "shop", "left": {"source": "a", "id": "a1"}, "right": {"source": "b", "id": "b1"}}
            assert client.post("/match", json=refs).status_code == 200
        finally:
            recorder.release.set()
            worker.join(30)
        assert first["r"].status_code == 200, first["r"].text
        # The slot is free again.
        assert client.post("/candidates", json={"dataset": "slow", "record": INLINE}).status_code == 200


# ---------------------------------------------------------------------------------------------------- k


def test_k_is_bounded(client, products):
    for k in (0, 1001):
        response = client.get(f"/candidates?dataset=shop&source=a&id=a1&k={k}")
        assert_refusal(response, 422, "k")
        body = client.post("/candidates", json={"dataset": "shop", "record": INLINE, "k": k})
        assert_refusal(body, 422, "k")
    assert "1000" in client.get("/candidates?dataset=shop&source=a&id=a1&k=1001").json()["detail"]
