"""Ingestion: durable before 202, idempotent by (dataset, source, id) and content."""

from __future__ import annotations

from conftest import records_body
from sqlalchemy import func, select

from llmatch.db import make_engine, make_session_factory
from llmatch.models import IndexChange, Record


def test_ingest_counts_created_updated_unchanged(client):
    client.put("/datasets/shop", json={})
    first = client.post("/records", json=records_body("shop", "a", [("1", {"t": "x"}), ("2", {"t": "y"})]))
    assert first.status_code == 202
    assert first.json() == {"accepted": 2, "created": 2, "updated": 0, "unchanged": 0}
    again = client.post(
        "/records", json=records_body("shop", "a", [("1", {"t": "x"}), ("2", {"t": "z"}), ("3", {"t": "w"})])
    )
    assert again.json() == {"accepted": 3, "created": 1, "updated": 1, "unchanged": 1}


def test_key_order_does_not_change_content(client):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", [("1", {"a": "x", "b": 1})]))
    again = client.post("/records", json=records_body("shop", "a", [("1", {"b": 1, "a": "x"})]))
    assert again.json()["unchanged"] == 1


def test_same_id_in_two_sources_are_two_records(client):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", [("1", {"t": "x"})]))
    response = client.post("/records", json=records_body("shop", "b", [("1", {"t": "x"})]))
    assert response.json()["created"] == 1


def test_numeric_ids_are_kept_as_decimal_text(client):
    client.put("/datasets/shop", json={})
    client.post("/records", json={"dataset": "shop", "source": "a", "records": [{"id": 42, "attributes": {}}]})
    assert client.get("/records/shop/a/42").json()["id"] == "42"
    again = client.post("/records", json=records_body("shop", "a", [("42", {})]))
    assert again.json()["unchanged"] == 1


def test_records_are_durable_when_answered(client, settings):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", [(str(i), {"t": f"item {i}"}) for i in range(50)]))
    engine = make_engine(settings.resolved_database_url)  # a separate connection sees the committed rows
    with make_session_factory(engine)() as session:
        assert session.scalar(select(func.count()).select_from(Record)) == 50
    engine.dispose()


def test_new_content_replaces_old_and_is_encoded_again(products, client, drain, counting_pool):
    old = client.get("/records/shop/b/b5").json()
    response = client.post("/records", json=records_body("shop", "b", [("b5", {"name": "Canon EOS R6 camera"})]))
    assert response.json()["updated"] == 1
    record = client.get("/records/shop/b/b5").json()
    assert record["status"] == "pending" and record["text"] != old["text"]
    client.app.state.service.synchronizer.poll()
    candidates = client.get("/candidates", params=dict(dataset="shop", source="a", id="a2", k=10)).json()
    assert "b5" not in {c["id"] for c in candidates["candidates"]}, "the old vector left the index"
    calls = len(counting_pool.calls)
    drain()
    assert len(counting_pool.calls) == calls + 1
    candidates = client.get("/candidates", params=dict(dataset="shop", source="a", id="a2", k=2)).json()
    assert {c["id"] for c in candidates["candidates"]} == {"b2", "b5"}


def test_attribute_order_first_seen_is_the_default(client):
    client.put("/datasets/shop", json={})
    client.post("/records", json=records_body("shop", "a", [("1", {"name": "tv", "brand": "sony"})]))
    client.post("/records", json=records_body("shop", "b", [("2", {"brand": "lg", "price": 3, "name": "oled"})]))
    assert client.get("/datasets/shop").json()["seen_attributes"] == ["name", "brand", "price"]
    assert (
        client.get("/records/shop/b/2").json()["text"]
        == "[name] oled [\\name] [brand] lg [\\brand] [price] 3 [\\price]"
    )


def test_fixed_attributes_select_and_order(client):
    client.put("/datasets/shop", json={"attributes": ["brand", "name"], "serialization": "plain"})
    client.post("/records", json=records_body("shop", "a", [("1", {"name": "tv", "brand": "sony", "price": 5})]))
    assert client.get("/records/shop/a/1").json()["text"] == "sony tv"


def test_unchanged_records_log_no_index_change(products, client):
    with client.app.state.service.session_factory() as session:
        before = session.scalar(select(func.count()).select_from(IndexChange))
    client.post(
        "/records",
        json=records_body("shop", "a", [("a1", {"name": "sony bravia 55 inch 4k tv kd55x85j", "price": 899.0})]),
    )
    with client.app.state.service.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(IndexChange)) == before
