"""Bad input on every endpoint: a 4xx (never a 5xx) whose ``detail`` is one sentence a person can act on,
and nothing changed in storage, on SQLite and on PostgreSQL.

Every refusal leaves the stored state as it was, so the cases share one populated service per backend
(built once per module) instead of paying a fresh database and an encoding run for each of them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import BACKENDS, PG_ADMIN_URL, PRODUCTS_A, PRODUCTS_B, CountingPool, records_body
from fastapi.testclient import TestClient
from sqlalchemy import func, make_url, select

from encoder_worker.worker import EncoderWorker
from llmatch.db import make_engine
from llmatch.migrate import upgrade_to_head
from llmatch.models import Calibration, Dataset, Embedding, IndexChange, Record
from llmatch.settings import Settings
from service.app import create_app

JSON = {"content-type": "application/json"}
PENDING_ID = "a9"  # ingested into source "a" of every dataset after the others were encoded: never encoded
SMALL_LIMIT = 2048
# A server file path or a stack trace in an error body (API routes such as /datasets/x are not paths on disk).
SERVER_TEXT = re.compile(r'Traceback|File "|site-packages|\w\.py\b|(?<![\w.])/(tmp|home|usr|opt|var|work|root|srv)/')

# --------------------------------------------------------------------------------------------- fixtures


@contextlib.contextmanager
def _database(request: pytest.FixtureRequest, backend: str, base: Path) -> Iterator[str]:
    """A fresh migrated database on ``backend`` for one module."""
    if backend == "sqlite":
        url = f"sqlite:///{base / 'llmatch.sqlite3'}"
        engine = make_engine(url)
        upgrade_to_head(engine)
        engine.dispose()
        yield url
        return
    template = request.getfixturevalue("pg_template")
    name = f"llmatch_bad_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield str(make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name))
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _settings(url: str, base: Path, **extra: Any) -> Settings:
    return Settings(
        database_url=url,
        data_dir=base / "data",
        worker_batch_size=16,
        worker_poll_seconds=0.05,
        index_sync_seconds=0.1,
        device="cpu",
        **extra,
    )


def _pairs(left: str = "a", right: str = "b") -> list[dict]:
    positives = [("a1", "b1"), ("a2", "b2"), ("a3", "b3"), ("a4", "b4")]
    negatives = [("a1", "b2"), ("a2", "b3"), ("a3", "b4"), ("a4", "b5")]
    return [pair(lid, rid, 1, left, right) for lid, rid in positives] + [
        pair(lid, rid, 0, left, right) for lid, rid in negatives
    ]


def pair(left_id: str, right_id: str, label: Any, left_source: str = "a", right_source: str = "b") -> dict:
    return {
        "left_source": left_source,
        "left_id": left_id,
        "right_source": right_source,
        "right_id": right_id,
        "label": label,
    }


@pytest.fixture(scope="module", params=BACKENDS)
def world(request: pytest.FixtureRequest, pool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """Datasets "shop" (calibrated) and "raw" (uncalibrated), each with sources a (a1..a4 encoded, a9 pending)
    and b (b1..b5 encoded)."""
    base = tmp_path_factory.mktemp(f"bad-input-{request.param}")
    with _database(request, request.param, base) as url:
        settings = _settings(url, base)
        counting = CountingPool(pool)
        with TestClient(create_app(settings, pool=counting, run_worker=False), base_url="http://localhost") as client:
            for name in ("shop", "raw"):
                assert client.put(f"/datasets/{name}", json={}).status_code == 201
                assert client.post("/records", json=records_body(name, "a", PRODUCTS_A)).status_code == 202
                assert client.post("/records", json=records_body(name, "b", PRODUCTS_B)).status_code == 202
            state = client.app.state.service
            EncoderWorker(state.session_factory, counting, settings).drain()
            state.synchronizer.poll()
            for name in ("shop", "raw"):
                late = records_body(name, "a", [(PENDING_ID, {"name": "nintendo switch oled console"})])
                assert client.post("/records", json=late).status_code == 202
            assert client.post("/datasets/shop/calibrate", json={"pairs": _pairs()}).status_code == 200
            assert client.get("/datasets/shop").json()["calibration"] is not None
            assert client.get("/datasets/raw").json()["calibration"] is None
            assert client.get(f"/records/shop/a/{PENDING_ID}").json()["status"] == "pending"
            yield client


@pytest.fixture(scope="module", params=BACKENDS)
def small(request: pytest.FixtureRequest, pool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A service whose request bodies are limited to SMALL_LIMIT bytes, with dataset "shop" and source a."""
    base = tmp_path_factory.mktemp(f"bad-input-small-{request.param}")
    with _database(request, request.param, base) as url:
        settings = _settings(url, base).model_copy(update={"max_body_bytes": SMALL_LIMIT})
        with TestClient(
            create_app(settings, pool=CountingPool(pool), run_worker=False), base_url="http://localhost"
        ) as client:
            assert client.put("/datasets/shop", json={}).status_code == 201
            assert client.post("/records", json=records_body("shop", "a", PRODUCTS_A)).status_code == 202
            yield client


# ---------------------------------------------------------------------------------------------- helpers

MODELS = (Dataset, Record, Embedding, Calibration, IndexChange)


def snapshot(client: TestClient) -> dict:
    """What a refused request must leave as it was: the datasets as the API shows them (configuration,
    counts per source and status, calibration), every record's content and status, and the row counts."""
    with client.app.state.service.session_factory() as session:
        counts = {model.__name__: session.scalar(select(func.count()).select_from(model)) for model in MODELS}
        records = session.execute(
            select(
                Record.dataset_id,
                Record.source,
                Record.external_id,
                Record.content_hash,
                Record.status,
                Record.embedding_id,
            ).order_by(Record.id)
        ).all()
        calibrations = session.execute(
            select(Calibration.dataset_id, Calibration.threshold, Calibration.pairs, Calibration.created_at).order_by(
                Calibration.dataset_id
            )
        ).all()
    return {
        "datasets": client.get("/datasets").json(),
        "counts": counts,
        "records": [tuple(row) for row in records],
        "calibrations": [tuple(row) for row in calibrations],
    }


def assert_sentence(response, fragment: str) -> str:
    """The body is ``{"detail": "<one readable sentence>", ...}`` and the sentence contains ``fragment``."""
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict), f"the error body is not an object: {body!r}"
    detail = body.get("detail")
    assert isinstance(detail, str), f"detail is not a string: {detail!r}"
    assert fragment in detail, f"{fragment!r} not in detail {detail!r}"
    assert detail[:1].isupper() or detail[:1].isdigit(), f"not a sentence: {detail!r}"
    assert detail.endswith("."), f"not a sentence: {detail!r}"
    assert "\n" not in detail and len(detail) <= 400, f"not one short sentence: {detail!r}"
    for noise in ("validation error for", "errors.pydantic.dev", "input_value=", "Traceback", "[type=", "[key]"):
        assert noise not in detail, f"internal text in detail: {detail!r}"
    return detail


def refused(client: TestClient, method: str, url: str, status: int, fragment: str, **kwargs: Any) -> str:
    """Send a bad request; check the status, the detail sentence and that nothing changed (or was encoded,
    for requests refused by validation). Returns the detail."""
    before = snapshot(client)
    calls = len(client.app.state.service.pool.calls)
    response = client.request(method, url, **kwargs)
    assert response.status_code < 500, f"{method} {url} -> {response.status_code}: {response.text[:500]}"
    assert response.status_code == status, f"{method} {url} -> {response.status_code}: {response.text[:500]}"
    detail = assert_sentence(response, fragment)
    leak = SERVER_TEXT.search(response.text)
    assert leak is None, f"{method} {url}: the error body shows server internals ({leak[0]!r}): {response.text[:300]}"
    assert snapshot(client) == before, f"{method} {url} was refused ({status}) but changed the stored state"
    if status in (400, 413, 422):
        assert len(client.app.state.service.pool.calls) == calls, "a request refused as invalid was encoded"
    return detail


def changed(base: dict, **updates: Any) -> dict:
    """A copy of ``base`` with keys replaced; a value of ``...`` removes the key."""
    result = {**base, **updates}
    return {key: value for key, value in result.items() if value is not ...}


# ------------------------------------------------------------------------------------ bodies in general

BODY_ROUTES = [
    ("POST", "/records"),
    ("PUT", "/datasets/shop"),
    ("POST", "/match"),
    ("POST", "/candidates"),
    ("POST", "/datasets/shop/calibrate"),
]
REQUIRED_BODY_ROUTES = [route for route in BODY_ROUTES if route[0] == "POST"]


@pytest.mark.parametrize("route", BODY_ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
@pytest.mark.parametrize(
    "text",
    ['{"dataset": "shop",', "{'dataset': 'shop'}", '{"pairs": []} trailing', "{"],
    ids=["truncated", "single-quotes", "trailing-text", "open-brace"],
)
def test_malformed_json_is_400(world, route, text):
    refused(world, *route, 400, "not valid JSON", content=text, headers=JSON)


@pytest.mark.parametrize("route", BODY_ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
@pytest.mark.parametrize(
    "text",
    ["[]", '[{"dataset": "shop"}]', '"shop"', "42", "true"],
    ids=["empty-list", "list", "string", "number", "bool"],
)
def test_body_that_is_not_an_object_is_422(world, route, text):
    refused(world, *route, 422, "JSON object", content=text, headers=JSON)


@pytest.mark.parametrize("route", REQUIRED_BODY_ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
def test_missing_body_is_422(world, route):
    refused(world, *route, 422, "body is missing")


@pytest.mark.parametrize("route", REQUIRED_BODY_ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
def test_json_null_body_is_422(world, route):
    refused(world, *route, 422, "JSON object", content="null", headers=JSON)


def test_json_sent_as_plain_text_is_refused(world):
    body = json.dumps(records_body("shop", "a", [("t1", {"name": "x"})]))
    refused(
        world,
        "POST",
        "/records",
        422,
        "Content-Type: application/json",
        content=body,
        headers={"content-type": "text/plain"},
    )


# --------------------------------------------------------------------------------------- POST /records

GOOD_RECORD = {"id": "new1", "attributes": {"name": "lg oled tv"}}
GOOD_BATCH = {"dataset": "shop", "source": "a", "records": [GOOD_RECORD]}


def batch(*records: Any, **fields: Any) -> dict:
    return changed(GOOD_BATCH, records=list(records), **fields)


def with_record(**fields: Any) -> dict:
    return batch(changed(GOOD_RECORD, **fields))


RECORDS_CASES = {
    # shape of the batch
    "records-an-object": (changed(GOOD_BATCH, records=GOOD_RECORD), 422, "records"),
    "records-a-string": (changed(GOOD_BATCH, records="new1"), 422, "records"),
    "records-null": (changed(GOOD_BATCH, records=None), 422, "records"),
    "records-missing": (changed(GOOD_BATCH, records=...), 422, "records"),
    "record-a-string": (batch("new1"), 422, "records[0]"),
    "record-null": (batch(None), 422, "records[0]"),
    "empty-batch": (batch(), 422, "records"),
    "extra-top-level-field": (changed(GOOD_BATCH, mode="replace"), 422, "mode"),
    "extra-record-field": (with_record(name="lg oled tv"), 422, "name"),
    "second-record-bad": (batch(GOOD_RECORD, {"id": "new2", "attributes": {"name": ["x"]}}), 422, "records[1]"),
    # attributes
    "attributes-a-list": (with_record(attributes=["name"]), 422, "attributes"),
    "attributes-a-string": (with_record(attributes="name=lg"), 422, "attributes"),
    "attributes-null": (with_record(attributes=None), 422, "attributes"),
    "attributes-missing": (with_record(attributes=...), 422, "attributes"),
    "value-a-list": (with_record(attributes={"name": ["lg", "tv"]}), 422, "'name'"),
    "value-an-object": (with_record(attributes={"name": {"brand": "lg"}}), 422, "'name'"),
    "value-a-bool": (with_record(attributes={"in_stock": True}), 422, "'in_stock'"),
    "too-many-attributes": (with_record(attributes={f"f{i}": i for i in range(257)}), 422, "256"),
    "value-too-long": (with_record(attributes={"name": "x" * 65_537}), 422, "65536"),
    "attribute-name-empty": (with_record(attributes={"": "x"}), 422, "attributes"),
    "attribute-name-too-long": (with_record(attributes={"n" * 257: "x"}), 422, "attributes"),
    # ids
    "id-null": (with_record(id=None), 422, "records[0].id"),
    "id-true": (with_record(id=True), 422, "records[0].id"),
    "id-false": (with_record(id=False), 422, "records[0].id"),
    "id-a-list": (with_record(id=["new1"]), 422, "records[0].id"),
    "id-an-object": (with_record(id={"id": "new1"}), 422, "records[0].id"),
    "id-missing": (with_record(id=...), 422, "records[0].id"),
    "id-empty": (with_record(id=""), 422, "records[0].id"),
    "id-too-long": (with_record(id="i" * 257), 422, "256"),
    "duplicate-ids": (batch({"id": "dup", "attributes": {}}, {"id": "dup", "attributes": {"name": "x"}}), 422, "'dup'"),
    "duplicate-ids-number-and-text": (batch({"id": 7, "attributes": {}}, {"id": "7", "attributes": {}}), 422, "'7'"),
    # names
    "unknown-dataset": (changed(GOOD_BATCH, dataset="nosuch"), 404, "PUT /datasets/nosuch"),
    "dataset-uppercase": (changed(GOOD_BATCH, dataset="Shop"), 422, "dataset"),
    "dataset-65-chars": (changed(GOOD_BATCH, dataset="d" * 65), 422, "dataset"),
    "dataset-with-space": (changed(GOOD_BATCH, dataset="my shop"), 422, "dataset"),
    "dataset-empty": (changed(GOOD_BATCH, dataset=""), 422, "dataset"),
    "dataset-a-number": (changed(GOOD_BATCH, dataset=5), 422, "dataset"),
    "dataset-missing": (changed(GOOD_BATCH, dataset=...), 422, "dataset"),
    "source-with-space": (changed(GOOD_BATCH, source="a b"), 422, "source"),
    "source-empty": (changed(GOOD_BATCH, source=""), 422, "source"),
    "source-65-chars": (changed(GOOD_BATCH, source="s" * 65), 422, "source"),
    "source-with-slash": (changed(GOOD_BATCH, source="a/b"), 422, "source"),
    "source-null": (changed(GOOD_BATCH, source=None), 422, "source"),
    "source-missing": (changed(GOOD_BATCH, source=...), 422, "source"),
}


@pytest.mark.parametrize(("body", "status", "fragment"), RECORDS_CASES.values(), ids=RECORDS_CASES.keys())
def test_post_records_refused(world, body, status, fragment):
    refused(world, "POST", "/records", status, fragment, json=body)


RAW_RECORDS_CASES = {
    "value-nan": ('{"dataset": "shop", "source": "a", "records": [{"id": "n1", "attributes": {"x": NaN}}]}', "'x'"),
    "value-infinity": (
        '{"dataset": "shop", "source": "a", "records": [{"id": "n1", "attributes": {"x": Infinity}}]}',
        "'x'",
    ),
    "value-minus-infinity": (
        '{"dataset": "shop", "source": "a", "records": [{"id": "n1", "attributes": {"x": -Infinity}}]}',
        "'x'",
    ),
    "id-nan": ('{"dataset": "shop", "source": "a", "records": [{"id": NaN, "attributes": {"x": 1}}]}', "records[0].id"),
}


@pytest.mark.parametrize(("text", "fragment"), RAW_RECORDS_CASES.values(), ids=RAW_RECORDS_CASES.keys())
def test_post_records_non_finite_numbers_refused(world, text, fragment):
    refused(world, "POST", "/records", 422, fragment, content=text, headers=JSON)


@functools.cache
def oversized_batch() -> str:
    """10,001 minimal records as JSON text (built once)."""
    records = ",".join(f'{{"id":"bulk{i}","attributes":{{}}}}' for i in range(10_001))
    return f'{{"dataset":"shop","source":"a","records":[{records}]}}'


def test_post_records_over_10000_records_refused(world):
    refused(world, "POST", "/records", 422, "10000", content=oversized_batch(), headers=JSON)


# ------------------------------------------------------------------------------------- body size (413)


def _big(route: str) -> dict:
    if route == "/records":
        return records_body("shop", "a", [(f"big{i}", {"name": f"a long product name number {i}"}) for i in range(100)])
    if route == "/datasets/big":
        return {"instruction": "Find the product. " * 200}
    return {"pairs": [pair("a1", "a2", i % 2, "a", "a") for i in range(100)]}


@pytest.mark.parametrize("transfer", ["content-length", "chunked"])
@pytest.mark.parametrize(
    ("method", "route"),
    [("POST", "/records"), ("PUT", "/datasets/big"), ("POST", "/datasets/shop/calibrate")],
    ids=["records", "put-dataset", "calibrate"],
)
def test_body_over_the_size_limit_is_413(small, transfer, method, route):
    payload = json.dumps(_big(route)).encode()
    assert len(payload) > SMALL_LIMIT
    if transfer == "content-length":
        content: Any = payload
    else:
        content = (payload[start : start + 512] for start in range(0, len(payload), 512))
    refused(small, method, route, 413, f"{SMALL_LIMIT} bytes", content=content, headers=JSON)
    assert small.get("/datasets/big").status_code == 404


def test_small_service_still_accepts_small_bodies(small):
    """The limit refuses what is too big, not everything (so the 413s above are about size)."""
    response = small.post("/records", json=records_body("shop", "b", [("s1", {"name": "x"})]))
    assert response.status_code == 202
    assert small.delete("/records/shop/b/s1").status_code == 204


# ---------------------------------------------------------------------------------- PUT /datasets/{name}

DATASET_BODY_CASES = {
    "unknown-encoder": ({"encoder": "nosuch-encoder"}, "minilm"),
    "unknown-encoder-named-verbatim": ({"encoder": "BertBase"}, "'BertBase'"),
    "encoder-a-number": ({"encoder": 5}, "encoder"),
    "encoder-empty": ({"encoder": ""}, "encoder"),
    "encoder-a-list": ({"encoder": ["minilm"]}, "encoder"),
    "serialization-json": ({"serialization": "json"}, "serialization"),
    "serialization-uppercase": ({"serialization": "Tagged"}, "serialization"),
    "serialization-a-number": ({"serialization": 1}, "serialization"),
    "attributes-repeated": ({"attributes": ["name", "price", "name"]}, "repeat"),
    "attributes-empty": ({"attributes": []}, "attributes"),
    "attributes-a-string": ({"attributes": "name"}, "attributes"),
    "attributes-of-numbers": ({"attributes": [1, 2]}, "attributes"),
    "attributes-empty-name": ({"attributes": [""]}, "attributes"),
    "attributes-257-names": ({"attributes": [f"f{i}" for i in range(257)]}, "256"),
    "instruction-too-long": ({"instruction": "i" * 4097}, "instruction"),
    "instruction-a-number": ({"instruction": 5}, "instruction"),
    "extra-field": ({"threshold": 0.5}, "threshold"),
}


@pytest.mark.parametrize("name", ["shop", "fresh"], ids=["existing", "new"])
@pytest.mark.parametrize(("body", "fragment"), DATASET_BODY_CASES.values(), ids=DATASET_BODY_CASES.keys())
def test_put_dataset_refused(world, name, body, fragment):
    refused(world, "PUT", f"/datasets/{name}", 422, fragment, json=body)
    assert world.get("/datasets/fresh").status_code == 404


@pytest.mark.parametrize("name", ["shop", "fresh"], ids=["existing", "new"])
def test_put_dataset_with_unfetched_smollm2_is_422(world, name):
    assert not Path(world.app.state.service.pool.spec("smollm2").model).exists(), "precondition: not fetched"
    refused(world, "PUT", f"/datasets/{name}", 422, "llmatch fetch-smollm2", json={"encoder": "smollm2"})


@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE"])
@pytest.mark.parametrize(
    "name",
    ["Shop", "d" * 65, "my shop", "shop.v2", "caf\u00e9"],
    ids=["uppercase", "65-chars", "space", "dot", "non-ascii"],
)
def test_malformed_dataset_name_in_path_is_422(world, method, name):
    refused(world, method, f"/datasets/{name}", 422, "name", **({"json": {}} if method == "PUT" else {}))


# -------------------------------------------------------------------------------- unknown things (404)

NOT_FOUND_CASES = {
    "get-unknown-dataset": ("GET", "/datasets/nosuch", "PUT /datasets/nosuch"),
    "delete-unknown-dataset": ("DELETE", "/datasets/nosuch", "'nosuch'"),
    "get-unknown-record": ("GET", "/records/shop/a/zz", "'zz'"),
    "delete-unknown-record": ("DELETE", "/records/shop/a/zz", "'zz'"),
    "get-record-of-unknown-source": ("GET", "/records/shop/q/a1", "'q'"),
    "delete-record-of-unknown-source": ("DELETE", "/records/shop/q/a1", "'q'"),
    "get-record-of-other-source": ("GET", "/records/shop/b/a1", "'a1'"),
    "get-record-of-unknown-dataset": ("GET", "/records/nosuch/a/a1", "PUT /datasets/nosuch"),
    "delete-record-of-unknown-dataset": ("DELETE", "/records/nosuch/a/a1", "PUT /datasets/nosuch"),
    "calibrate-unknown-dataset": ("POST", "/datasets/nosuch/calibrate", "PUT /datasets/nosuch"),
}


@pytest.mark.parametrize(("method", "url", "fragment"), NOT_FOUND_CASES.values(), ids=NOT_FOUND_CASES.keys())
def test_unknown_is_404(world, method, url, fragment):
    kwargs = {"json": {"pairs": _pairs()}} if method == "POST" else {}
    refused(world, method, url, 404, fragment, **kwargs)


MALFORMED_RECORD_PATH_CASES = {
    "dataset-uppercase": ("/records/Shop/a/a1", "dataset"),
    "source-with-space": ("/records/shop/a b/a1", "source"),
    "source-65-chars": (f"/records/shop/{'s' * 65}/a1", "source"),
    "id-257-chars": (f"/records/shop/a/{'i' * 257}", "record_id"),
}


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize(
    ("url", "fragment"), MALFORMED_RECORD_PATH_CASES.values(), ids=MALFORMED_RECORD_PATH_CASES.keys()
)
def test_malformed_record_path_is_422(world, method, url, fragment):
    refused(world, method, url, 422, fragment)


# ------------------------------------------------------------------------------------------- GET /match

MATCH_PARAMS = {"dataset": "shop", "left_source": "a", "left_id": "a1", "right_source": "b", "right_id": "b1"}

GET_MATCH_CASES = {
    "no-params": ({}, 422, "dataset"),
    "missing-dataset": (changed(MATCH_PARAMS, dataset=...), 422, "dataset"),
    "missing-left-source": (changed(MATCH_PARAMS, left_source=...), 422, "left_source"),
    "missing-left-id": (changed(MATCH_PARAMS, left_id=...), 422, "left_id"),
    "missing-right-source": (changed(MATCH_PARAMS, right_source=...), 422, "right_source"),
    "missing-right-id": (changed(MATCH_PARAMS, right_id=...), 422, "right_id"),
    "malformed-dataset": (changed(MATCH_PARAMS, dataset="Shop"), 422, "dataset"),
    "malformed-left-source": (changed(MATCH_PARAMS, left_source="a b"), 422, "left_source"),
    "malformed-right-source": (changed(MATCH_PARAMS, right_source="s" * 65), 422, "right_source"),
    "empty-left-id": (changed(MATCH_PARAMS, left_id=""), 422, "left_id"),
    "right-id-too-long": (changed(MATCH_PARAMS, right_id="i" * 257), 422, "right_id"),
    "unknown-dataset": (changed(MATCH_PARAMS, dataset="nosuch"), 404, "PUT /datasets/nosuch"),
    "unknown-left-record": (changed(MATCH_PARAMS, left_id="zz"), 404, "'zz'"),
    "unknown-right-record": (changed(MATCH_PARAMS, right_id="zz9"), 404, "'zz9'"),
    "unknown-left-source": (changed(MATCH_PARAMS, left_source="q"), 404, "'q'"),
    "left-not-encoded": (changed(MATCH_PARAMS, left_id=PENDING_ID), 409, f"'{PENDING_ID}'"),
    "right-not-encoded": (changed(MATCH_PARAMS, right_source="a", right_id=PENDING_ID), 409, f"'{PENDING_ID}'"),
}


@pytest.mark.parametrize(("params", "status", "fragment"), GET_MATCH_CASES.values(), ids=GET_MATCH_CASES.keys())
def test_get_match_refused(world, params, status, fragment):
    refused(world, "GET", "/match", status, fragment, params=params)


def test_get_match_not_encoded_says_so(world):
    detail = refused(
        world, "GET", "/match", 409, "not encoded", params=changed(MATCH_PARAMS, right_id=PENDING_ID, right_source="a")
    )
    assert PENDING_ID in detail


# ------------------------------------------------------------------------------------------ POST /match

REF_A1 = {"source": "a", "id": "a1"}
MATCH_BODY = {"dataset": "shop", "left": REF_A1, "right": {"source": "b", "id": "b1"}}

POST_MATCH_CASES = {
    "side-neither-ref-nor-inline": (changed(MATCH_BODY, left={"foo": 1}), 422, "left"),
    "side-empty-object": (changed(MATCH_BODY, right={}), 422, "right"),
    "side-a-string": (changed(MATCH_BODY, left="a1"), 422, "left"),
    "side-null": (changed(MATCH_BODY, left=None), 422, "left"),
    "side-a-list": (changed(MATCH_BODY, right=["b", "b1"]), 422, "right"),
    "side-missing": (changed(MATCH_BODY, right=...), 422, "right"),
    "inline-value-a-list": (changed(MATCH_BODY, left={"attributes": {"name": ["sony", "tv"]}}), 422, "'name'"),
    "inline-value-a-bool": (changed(MATCH_BODY, right={"attributes": {"in_stock": False}}), 422, "'in_stock'"),
    "inline-value-too-long": (changed(MATCH_BODY, left={"attributes": {"name": "x" * 65_537}}), 422, "65536"),
    "inline-attributes-a-string": (changed(MATCH_BODY, left={"attributes": "sony tv"}), 422, "attributes"),
    "inline-with-extra-field": (changed(MATCH_BODY, left={"attributes": {"name": "tv"}, "source": "a"}), 422, "left"),
    "ref-malformed-source": (changed(MATCH_BODY, left={"source": "a b", "id": "a1"}), 422, "source"),
    "ref-missing-id": (changed(MATCH_BODY, left={"source": "a"}), 422, "id"),
    "ref-id-null": (changed(MATCH_BODY, left={"source": "a", "id": None}), 422, "id"),
    "ref-empty-id": (changed(MATCH_BODY, right={"source": "b", "id": ""}), 422, "id"),
    "ref-extra-field": (changed(MATCH_BODY, right={"source": "b", "id": "b1", "k": 3}), 422, "right"),
    "dataset-malformed": (changed(MATCH_BODY, dataset="Shop"), 422, "dataset"),
    "dataset-missing": (changed(MATCH_BODY, dataset=...), 422, "dataset"),
    "extra-field": (changed(MATCH_BODY, threshold=0.5), 422, "threshold"),
    "unknown-dataset": (changed(MATCH_BODY, dataset="nosuch"), 404, "PUT /datasets/nosuch"),
    "unknown-ref": (changed(MATCH_BODY, right={"source": "b", "id": "zz"}), 404, "'zz'"),
    "unknown-ref-source": (changed(MATCH_BODY, left={"source": "q", "id": "a1"}), 404, "'q'"),
    "ref-not-encoded": (changed(MATCH_BODY, left={"source": "a", "id": PENDING_ID}), 409, f"'{PENDING_ID}'"),
}


@pytest.mark.parametrize(("body", "status", "fragment"), POST_MATCH_CASES.values(), ids=POST_MATCH_CASES.keys())
def test_post_match_refused(world, body, status, fragment):
    refused(world, "POST", "/match", status, fragment, json=body)


def test_post_match_inline_nan_refused(world):
    text = '{"dataset": "shop", "left": {"attributes": {"x": NaN}}, "right": {"source": "b", "id": "b1"}}'
    refused(world, "POST", "/match", 422, "'x'", content=text, headers=JSON)


# ------------------------------------------------------------------------------------- GET /candidates

CANDIDATE_PARAMS = {"dataset": "shop", "source": "a", "id": "a1"}

GET_CANDIDATES_CASES = {
    "k-0": (changed(CANDIDATE_PARAMS, k=0), 422, "k"),
    "k-1001": (changed(CANDIDATE_PARAMS, k=1001), 422, "k"),
    "k-negative": (changed(CANDIDATE_PARAMS, k=-1), 422, "k"),
    "k-ten": (changed(CANDIDATE_PARAMS, k="ten"), 422, "k"),
    "k-fraction": (changed(CANDIDATE_PARAMS, k="2.5"), 422, "k"),
    "no-params": ({}, 422, "dataset"),
    "missing-id": (changed(CANDIDATE_PARAMS, id=...), 422, "id"),
    "missing-source": (changed(CANDIDATE_PARAMS, source=...), 422, "source"),
    "malformed-target-source": (changed(CANDIDATE_PARAMS, target_source="a b"), 422, "target_source"),
    "malformed-dataset": (changed(CANDIDATE_PARAMS, dataset="Shop"), 422, "dataset"),
    "unknown-dataset": (changed(CANDIDATE_PARAMS, dataset="nosuch"), 404, "PUT /datasets/nosuch"),
    "unknown-target-source": (changed(CANDIDATE_PARAMS, target_source="zz"), 404, "a, b"),
    "unknown-record": (changed(CANDIDATE_PARAMS, id="zz"), 404, "'zz'"),
    "unknown-source": (changed(CANDIDATE_PARAMS, source="q"), 404, "'q'"),
    "record-not-encoded": (changed(CANDIDATE_PARAMS, id=PENDING_ID), 409, f"'{PENDING_ID}'"),
}


@pytest.mark.parametrize(
    ("params", "status", "fragment"), GET_CANDIDATES_CASES.values(), ids=GET_CANDIDATES_CASES.keys()
)
def test_get_candidates_refused(world, params, status, fragment):
    refused(world, "GET", "/candidates", status, fragment, params=params)


def test_get_candidates_unknown_target_source_names_the_dataset_and_target(world):
    detail = refused(world, "GET", "/candidates", 404, "'zz'", params=changed(CANDIDATE_PARAMS, target_source="zz"))
    assert "'shop'" in detail and "a, b" in detail


# ------------------------------------------------------------------------------------ POST /candidates

CANDIDATES_BODY = {"dataset": "shop", "record": {"attributes": {"name": "sony 4k tv"}}, "k": 3}

POST_CANDIDATES_CASES = {
    "k-0": (changed(CANDIDATES_BODY, k=0), 422, "k"),
    "k-1001": (changed(CANDIDATES_BODY, k=1001), 422, "k"),
    "k-ten": (changed(CANDIDATES_BODY, k="ten"), 422, "k"),
    "k-fraction": (changed(CANDIDATES_BODY, k=2.5), 422, "k"),
    "k-null": (changed(CANDIDATES_BODY, k=None), 422, "k"),
    "record-missing": (changed(CANDIDATES_BODY, record=...), 422, "record"),
    "record-without-attributes": (changed(CANDIDATES_BODY, record={}), 422, "attributes"),
    "record-a-string": (changed(CANDIDATES_BODY, record="sony tv"), 422, "record"),
    "record-null": (changed(CANDIDATES_BODY, record=None), 422, "record"),
    "record-bad-value": (changed(CANDIDATES_BODY, record={"attributes": {"name": {"a": 1}}}), 422, "'name'"),
    "record-with-id": (changed(CANDIDATES_BODY, record={"id": "x", "attributes": {"name": "tv"}}), 422, "id"),
    "malformed-target-source": (changed(CANDIDATES_BODY, target_source="a b"), 422, "target_source"),
    "dataset-malformed": (changed(CANDIDATES_BODY, dataset="Shop"), 422, "dataset"),
    "extra-field": (changed(CANDIDATES_BODY, source="a"), 422, "source"),
    "unknown-dataset": (changed(CANDIDATES_BODY, dataset="nosuch"), 404, "PUT /datasets/nosuch"),
    "unknown-target-source": (changed(CANDIDATES_BODY, target_source="zz"), 404, "a, b"),
}


@pytest.mark.parametrize(
    ("body", "status", "fragment"), POST_CANDIDATES_CASES.values(), ids=POST_CANDIDATES_CASES.keys()
)
def test_post_candidates_refused(world, body, status, fragment):
    refused(world, "POST", "/candidates", status, fragment, json=body)


# --------------------------------------------------------------------------- POST /datasets/{name}/calibrate


def with_label(label: Any) -> dict:
    return {"pairs": [pair("a1", "b1", label)] + _pairs()[4:] + _pairs()[:3]}


CALIBRATE_CASES = {
    "label-2": (with_label(2), 422, "label"),
    "label-minus-1": (with_label(-1), 422, "label"),
    "label-string": (with_label("1"), 422, "label"),
    "label-true": (with_label(True), 422, "label"),
    "label-fraction": (with_label(0.5), 422, "label"),
    "label-null": (with_label(None), 422, "label"),
    "label-missing": ({"pairs": [changed(pair("a1", "b1", 1), label=...), *_pairs()]}, 422, "label"),
    "no-positives": ({"pairs": [p for p in _pairs() if p["label"] == 0]}, 422, "matches (label 1)"),
    "no-negatives": ({"pairs": [p for p in _pairs() if p["label"] == 1]}, 422, "non-matches (label 0)"),
    "single-pair": ({"pairs": [pair("a1", "b1", 1)]}, 422, "non-matches"),
    "empty-pairs": ({"pairs": []}, 422, "pairs"),
    "pairs-missing": ({}, 422, "pairs"),
    "pairs-an-object": ({"pairs": pair("a1", "b1", 1)}, 422, "pairs"),
    "pair-a-list": ({"pairs": [["a", "a1", "b", "b1", 1], *_pairs()]}, 422, "pairs[0]"),
    "objective-accuracy": ({"pairs": _pairs(), "objective": "accuracy"}, 422, "objective"),
    "objective-null": ({"pairs": _pairs(), "objective": None}, 422, "objective"),
    "pair-malformed-source": ({"pairs": [pair("a1", "b1", 1, left_source="a b"), *_pairs()]}, 422, "left_source"),
    "pair-empty-id": ({"pairs": [pair("a1", "", 0), *_pairs()]}, 422, "right_id"),
    "pair-id-null": ({"pairs": [pair(None, "b1", 0), *_pairs()]}, 422, "left_id"),
    "pair-extra-field": ({"pairs": [{**pair("a1", "b1", 1), "weight": 2}, *_pairs()]}, 422, "weight"),
    "extra-field": ({"pairs": _pairs(), "threshold": 0.5}, 422, "threshold"),
    "unknown-record": ({"pairs": [pair("a1", "zz", 0), *_pairs()]}, 404, "b/zz"),
    "unknown-source": ({"pairs": [pair("a1", "b1", 0, right_source="q"), *_pairs()]}, 404, "q/b1"),
    "record-not-encoded": ({"pairs": [pair(PENDING_ID, "b1", 0), *_pairs()]}, 409, f"a/{PENDING_ID}"),
}


@pytest.mark.parametrize("dataset", ["shop", "raw"], ids=["calibrated", "uncalibrated"])
@pytest.mark.parametrize(("body", "status", "fragment"), CALIBRATE_CASES.values(), ids=CALIBRATE_CASES.keys())
def test_calibrate_refused_keeps_the_calibration(world, dataset, body, status, fragment):
    before = world.get(f"/datasets/{dataset}").json()["calibration"]
    assert (before is None) == (dataset == "raw")
    refused(world, "POST", f"/datasets/{dataset}/calibrate", status, fragment, json=body)
    assert world.get(f"/datasets/{dataset}").json()["calibration"] == before


def test_calibrate_with_malformed_dataset_name_is_422(world):
    refused(world, "POST", "/datasets/Shop/calibrate", 422, "name", json={"pairs": _pairs()})


# ------------------------------------------------------------------------------ methods and routes


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("DELETE", "/match"),
        ("PUT", "/match"),
        ("DELETE", "/candidates"),
        ("PATCH", "/datasets/shop"),
        ("POST", "/datasets/shop"),
        ("DELETE", "/datasets"),
        ("GET", "/records"),
        ("PUT", "/records"),
        ("POST", "/records/shop/a/a1"),
        ("GET", "/datasets/shop/calibrate"),
        ("POST", "/healthz"),
    ],
)
def test_wrong_method_is_405(world, method, url):
    refused(world, method, url, 405, "method")


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/nope"),
        ("POST", "/v2/records"),
        ("GET", "/datasets/shop/records"),
        ("DELETE", "/datasets/shop/calibration"),
        ("GET", "/match/shop"),
    ],
)
def test_unknown_route_is_404(world, method, url):
    refused(world, method, url, 404, "route")


# ------------------------------------------------------------------------------------ integer bounds

# A valid value for every parameter a route may require, so that only the integer under test is wrong.
PARAMETER_EXAMPLES = {
    "name": "shop",
    "dataset": "shop",
    "source": "a",
    "record_id": "a1",
    "id": "a1",
    "left_source": "a",
    "left_id": "a1",
    "right_source": "b",
    "right_id": "b1",
    "entity_id": "1",
}
HUGE_INTEGERS = [2**64, 10**30]


def integer_parameters(client: TestClient) -> list[tuple[str, str, dict, dict]]:
    """(method, path, the integer parameter, the operation) of every operation in the OpenAPI document."""
    found = []
    for path, operations in client.app.openapi()["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if parameter["schema"].get("type") == "integer":
                    found.append((method.upper(), path, parameter, operation))
    return found


def request_for(path: str, operation: dict, name: str, value: int) -> tuple[str, dict[str, Any]]:
    """The URL and query of ``operation`` with the parameter ``name`` set to ``value``, the others valid."""
    assert "requestBody" not in operation, f"{path}: give test_integer_parameters an example body"
    values: dict[str, Any] = {}
    for parameter in operation.get("parameters", []):
        if parameter["name"] == name:
            values[name] = value
        elif parameter.get("required") or parameter["in"] == "path":
            assert parameter["name"] in PARAMETER_EXAMPLES, f"add {parameter['name']!r} to PARAMETER_EXAMPLES"
            values[parameter["name"]] = PARAMETER_EXAMPLES[parameter["name"]]
    in_path = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
    url = path.format(**{key: values.pop(key) for key in in_path})
    return url, values


def test_every_integer_parameter_has_a_maximum(world):
    found = integer_parameters(world)
    assert {(path, parameter["name"]) for _, path, parameter, _ in found} >= {
        ("/candidates", "k"),
        ("/datasets/{name}/entities", "min_size"),
        ("/datasets/{name}/entities", "offset"),
        ("/datasets/{name}/entities", "limit"),
        ("/datasets/{name}/review", "limit"),
    }
    unbounded = [f"{method} {path} {p['name']}" for method, path, p, _ in found if "maximum" not in p["schema"]]
    assert not unbounded, f"integer parameters without a maximum: {unbounded}"


def request_schemas(document: dict) -> set[str]:
    """The names of every schema a request body may contain, followed through references."""
    pending = [
        json.dumps(operation["requestBody"])
        for operations in document["paths"].values()
        for operation in operations.values()
        if "requestBody" in operation
    ]
    seen: set[str] = set()
    while pending:
        for name in re.findall(r'"#/components/schemas/([^"]+)"', pending.pop()):
            if name not in seen:
                seen.add(name)
                pending.append(json.dumps(document["components"]["schemas"][name]))
    return seen


def integer_schemas(schema: Any, where: str) -> Iterator[tuple[str, dict]]:
    """Every integer schema nested in ``schema``, with where it is."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            yield where, schema
        for key, value in schema.items():
            yield from integer_schemas(value, f"{where}.{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            yield from integer_schemas(value, f"{where}[{index}]")


def test_every_integer_field_of_a_request_body_has_a_maximum(world):
    document = world.app.openapi()
    fields = [
        (where, schema)
        for name in sorted(request_schemas(document))
        for where, schema in integer_schemas(document["components"]["schemas"][name], name)
    ]
    assert {where for where, _ in fields} >= {
        "CandidatesIn.properties.k",
        "IndexOptionsIn.properties.approximate_above.anyOf[0]",
        "IndexOptionsIn.properties.nprobe.anyOf[0]",
    }
    unbounded = [where for where, schema in fields if "maximum" not in schema and "enum" not in schema]
    assert not unbounded, f"integer fields of request bodies without a maximum: {unbounded}"


@pytest.mark.parametrize("value", HUGE_INTEGERS, ids=["2**64", "10**30"])
def test_integer_parameters_beyond_64_bits_are_422(world, value):
    found = integer_parameters(world)
    assert found
    for method, path, parameter, operation in found:
        url, params = request_for(path, operation, parameter["name"], value)
        refused(world, method, url, 422, parameter["name"], params=params)
        # The largest value allowed is answered (the 422 above comes from the bound, not another parameter).
        url, params = request_for(path, operation, parameter["name"], parameter["schema"].get("maximum", value))
        response = world.request(method, url, params=params)
        assert response.status_code in (200, 404, 409), f"{method} {url} {params}: {response.text[:300]}"


@pytest.mark.parametrize("value", HUGE_INTEGERS, ids=["2**64", "10**30"])
@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("POST", "/candidates", lambda v: {"dataset": "shop", "record": {"attributes": {"name": "tv"}}, "k": v}),
        ("PUT", "/datasets/shop", lambda v: {"index": {"approximate_above": v}}),
        ("PUT", "/datasets/shop", lambda v: {"index": {"nprobe": v}}),
        ("POST", "/datasets/shop/calibrate", lambda v: with_label(v)),
        ("PUT", "/datasets/shop/labels", lambda v: with_label(v)),
    ],
    ids=["candidates-k", "index-approximate-above", "index-nprobe", "calibrate-label", "labels-label"],
)
def test_integer_fields_beyond_64_bits_are_422(world, method, url, body, value):
    refused(world, method, url, 422, "", json=body(value))


@pytest.mark.parametrize("entity_id", ["²", "١", "0" * 18 + "²", "9" * 19, "-1", "+1", " 1"])
def test_entity_id_that_is_not_ascii_digits_is_404(world, entity_id):
    refused(world, "GET", f"/datasets/shop/entities/{entity_id}", 404, "No entity")
