"""The published OpenAPI says what the service sends: the contract's error body for every 4xx, 405 with every
allowed method, /metrics as text, the validators' constraints, timestamps with their timezone; and
schemathesis, generating requests from it, finds nothing."""

from __future__ import annotations

from datetime import datetime

from fastapi.routing import APIRoute, iter_route_contexts

from bench.reliability.fuzz import fuzz
from llmatch.db import make_engine, make_session_factory, transaction
from service.app import create_app
from service.keys import create_key
from service.openapi import ERROR
from service.schemas import MAX_ID_NUMBER
from tests.live_server import live_server

ERROR_REF = f"#/components/schemas/{ERROR}"


def _operations(schema: dict):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_every_error_answer_is_documented_with_the_contract_body(client):
    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert schema["components"]["schemas"][ERROR]["properties"]["detail"]["type"] == "string"
    for path, method, operation in _operations(schema):
        for status, response in operation["responses"].items():
            if status.startswith("4"):
                assert response["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}, (method, path)
        if operation.get("parameters") or operation.get("requestBody"):
            assert "422" in operation["responses"], (method, path)
        if operation.get("requestBody"):
            assert {"400", "413"} <= set(operation["responses"]), (method, path)
    assert {"404", "409"} <= set(schema["paths"]["/match"]["get"]["responses"])
    assert "404" in schema["paths"]["/records"]["post"]["responses"]
    assert "409" in schema["paths"]["/datasets/{name}/calibrate"]["post"]["responses"]


def test_every_route_is_covered_automatically(client):
    """Routes added later get the error model too: the mechanism reads the generated document, not a list."""
    schema = client.get("/openapi.json").json()
    for route in iter_route_contexts(client.app.routes):
        if isinstance(route.original_route, APIRoute) and route.include_in_schema:
            for method in route.methods:
                responses = schema["paths"][route.path_format][method.lower()]["responses"]
                documented = [s for s in responses if s.startswith("4")]
                assert all(responses[s]["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}
                           for s in documented)  # fmt: skip


def test_405_lists_every_method_of_the_path(client):
    response = client.request("PATCH", "/datasets/shop")
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET, PUT"
    assert response.json()["detail"]
    assert client.request("OPTIONS", "/records/shop/a/1").headers["allow"] == "DELETE, GET"


def test_metrics_are_documented_as_text(client):
    content = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(content) == ["text/plain"]
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_validator_constraints_are_in_the_schema(client):
    components = client.get("/openapi.json").json()["components"]["schemas"]
    record = components["RecordIn"]["properties"]
    text, number = record["id"]["anyOf"]
    assert (text["minLength"], text["maxLength"]) == (1, 256)
    assert (number["minimum"], number["maximum"]) == (-MAX_ID_NUMBER, MAX_ID_NUMBER)
    values = record["attributes"]["additionalProperties"]["anyOf"]
    assert {v["type"] for v in values} == {"string", "number", "null"}
    assert record["attributes"]["maxProperties"] == 256
    encoder = components["DatasetConfigIn"]["properties"]["encoder"]["anyOf"][0]
    assert "minilm" in encoder["enum"]


def test_ids_sent_as_numbers_are_refused_beyond_the_documented_range(client):
    assert client.put("/datasets/shop", json={}).status_code == 201
    body = {"dataset": "shop", "source": "a", "records": [{"id": MAX_ID_NUMBER, "attributes": {}}]}
    assert client.post("/records", json=body).status_code == 202
    body["records"][0]["id"] = MAX_ID_NUMBER + 1
    refused = client.post("/records", json=body)
    assert refused.status_code == 422 and "records[0].id" in refused.json()["detail"]


def test_timestamps_carry_their_timezone(products, client):
    dataset = client.get("/datasets/shop").json()
    for value in (dataset["created_at"], dataset["updated_at"]):
        assert datetime.fromisoformat(value).utcoffset() is not None, value
    record = client.get("/records/shop/a/a1").json()
    assert datetime.fromisoformat(record["encoded_at"]).utcoffset() is not None


def test_schemathesis_finds_no_failure(products, settings, counting_pool):
    """A few hundred requests generated from /openapi.json (every check, auth on with an admin key) on a server
    holding an encoded dataset: no 5xx, no undocumented status or body, no schema-valid request refused, no
    invalid one accepted."""
    with transaction(make_session_factory(make_engine(settings.resolved_database_url))) as session:
        key = create_key(session, "fuzz", ["admin"])
    app = create_app(settings, pool=counting_pool, run_worker=False)
    with live_server(app) as (url, _):
        result = fuzz(url, key=key, max_examples=5, seed=1, timeout=600)
    assert result["operations"] == result["operations_total"] > 0
    assert result["cases"] >= 200, result["output"][-3000:]
    output = result["output"]
    assert result["returncode"] == 0, output[output.find("FAILURES") :][:12000]
