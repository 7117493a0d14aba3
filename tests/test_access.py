"""Access control: every route under every kind of key (route x key -> status), on SQLite and PostgreSQL; the
key cache; the audit trail; the key commands and the start-up refusal; what errors and inline queries must
not reveal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import PRODUCTS_A, records_body
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import event, select, update
from sqlalchemy.exc import OperationalError

from encoding.registry import EncoderSpec
from llmatch.client import IngestError, ingest_records
from llmatch.db import make_engine, transaction
from llmatch.migrate import upgrade_to_head
from llmatch.models import ApiKey, AuditEvent, Record
from llmatch.settings import Settings
from service import auth, keys
from service.app import create_app
from service.keys import KeyCache

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [
    {"left_source": "a", "left_id": left, "right_source": "b", "right_id": right, "label": label}
    for left, right, label in [("a1", "b1", 1), ("a2", "b2", 1), ("a3", "b3", 1), ("a1", "b2", 0), ("a2", "b3", 0)]
]
INLINE = {"attributes": {"name": "bose qc 45 headset"}}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared fixture's settings, with keys re-read on every request (no cache delay to wait for)."""
    return settings.model_copy(update={"auth_cache_seconds": 0})


def make_key(client: TestClient, name: str, scopes: list[str], expires_days: float | None = None) -> str:
    with transaction(client.app.state.service.session_factory) as session:
        return keys.create_key(session, name, scopes, expires_days, actor="test")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------------------------------ the table

LEVEL_OF = {"read": "read", "write": "write", "manage": "manage"}


@dataclass
class Row:
    """One route: how to call it, what it needs, and its status when allowed."""

    method: str
    url: str
    level: str  # read | write | manage | admin | any-key | public
    ok: int
    dataset: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[TestClient, dict[str, str]], None] | None = None


def _scratch(client: TestClient, admin: dict[str, str]) -> None:
    """Recreate what destructive rows remove: dataset 'scratch' with record a/x."""
    client.put("/datasets/scratch", json={}, headers=admin)
    client.post("/records", json=records_body("scratch", "a", [("x", {"name": "x"})]), headers=admin)


MATCH = "/match?dataset=shop&left_source=a&left_id=a1&right_source=b&right_id=b1"
ROWS = [
    Row("GET", "/healthz", "public", 200),
    Row("GET", "/readyz", "public", 200),
    Row("GET", "/ui", "public", 200),
    Row("GET", "/metrics", "admin", 200),
    Row("GET", "/datasets", "any-key", 200),
    Row("GET", "/datasets/shop", "read", 200, "shop"),
    Row("PUT", "/datasets/scratch", "manage", 200, "scratch", {"json": {}}, _scratch),
    Row("DELETE", "/datasets/scratch", "manage", 204, "scratch", setup=_scratch),
    Row("POST", "/datasets/shop/calibrate", "manage", 200, "shop", {"json": {"pairs": PAIRS}}),
    Row("POST", "/datasets/scratch/requeue", "write", 200, "scratch", {"json": {"status": "failed"}}, _scratch),
    Row(
        "PUT",
        "/datasets/scratch/labels",
        "write",
        200,
        "scratch",
        {"json": {"pairs": [{"left_source": "a", "left_id": "x", "right_source": "a", "right_id": "y", "label": 0}]}},
        _scratch,
    ),
    Row("GET", "/datasets/shop/labels", "read", 200, "shop"),
    Row("DELETE", "/datasets/scratch/labels", "write", 204, "scratch", setup=_scratch),
    Row("GET", "/datasets/shop/review", "read", 200, "shop"),
    Row("GET", "/datasets/shop/entities", "read", 200, "shop"),
    Row("GET", "/datasets/shop/entities/nonexistent", "read", 404, "shop"),
    Row(
        "POST",
        "/records",
        "write",
        202,
        "scratch",
        {"json": records_body("scratch", "a", [("y", {"n": "y"})])},
        _scratch,
    ),
    Row("GET", "/records/shop/a/a1", "read", 200, "shop"),
    Row("DELETE", "/records/scratch/a/x", "write", 204, "scratch", setup=_scratch),
    Row("GET", MATCH, "read", 200, "shop"),
    Row("GET", MATCH + "&explain=true", "read", 200, "shop"),
    Row(
        "POST",
        "/match",
        "read",
        200,
        "shop",
        {"json": {"dataset": "shop", "left": INLINE, "right": {"source": "b", "id": "b4"}}},
    ),
    Row("GET", "/candidates?dataset=shop&source=a&id=a1&k=2", "read", 200, "shop"),
    Row("POST", "/candidates", "read", 200, "shop", {"json": {"dataset": "shop", "record": INLINE, "k": 2}}),
    # The batch forms; the trailing '?' keeps their key in the table (url and method) apart from the single forms'.
    Row(
        "POST",
        "/candidates?",
        "read",
        200,
        "shop",
        {"json": {"dataset": "shop", "records": [INLINE, {"source": "a", "id": "a1"}], "k": 2}},
    ),
    Row(
        "POST",
        "/match?",
        "read",
        200,
        "shop",
        {"json": {"dataset": "shop", "pairs": [{"left": INLINE, "right": {"source": "b", "id": "b4"}}]}},
    ),
    Row("GET", "/datasets/shop/pairs?k=2", "read", 200, "shop"),
    # Training jobs: shop has no stored labels (409 once allowed) and so no job (404).
    Row("POST", "/datasets/shop/train", "manage", 409, "shop", {"json": {}}),
    Row("GET", "/datasets/shop/train", "read", 404, "shop"),
    Row("DELETE", "/datasets/shop/train", "manage", 404, "shop"),
]
WHO = ("off", "none", "unknown", "revoked", "expired", "wrong", "read", "write", "manage", "admin")


def expected(row: Row, who: str) -> int:
    if row.level == "public" or who == "off":
        return row.ok
    if who in ("none", "unknown", "revoked", "expired"):
        return 401
    if row.level == "any-key" or who == "admin":
        return row.ok
    return row.ok if who == row.level else 403


def test_every_route_under_every_key(client, products):
    """route x key -> status: auth off (no key exists), no key, unknown, revoked, expired, a key for another
    dataset, DATASET:read, :write, :manage, admin."""
    _scratch(client, {})
    client.put("/datasets/other", json={})
    seen: dict[tuple[str, str], int] = {}
    details: dict[tuple[str, str], str] = {}

    def run(who: str, headers: dict[str, str], admin: dict[str, str]) -> None:
        for row in ROWS:
            if row.setup:
                row.setup(client, admin)
            response = client.request(row.method, row.url, headers=headers, **row.kwargs)
            seen[(row.url + " " + row.method, who)] = response.status_code
            details[(row.url + " " + row.method, who)] = f"{response.text} {response.headers.get('www-authenticate')}"

    run("off", {}, {})
    admin = bearer(make_key(client, "admin", ["admin"]))
    headers = {
        "none": {},
        "unknown": bearer("llm_" + "x" * 43),
        "revoked": bearer(make_key(client, "revoked", ["admin"])),
        "expired": bearer(make_key(client, "expired", ["admin"], expires_days=1)),
        "wrong": bearer(make_key(client, "wrong", ["other:read", "other:write", "other:manage"])),
        "admin": admin,
    }
    for level in ("read", "write", "manage"):
        headers[level] = bearer(make_key(client, level, [f"shop:{level}", f"scratch:{level}"]))
    with transaction(client.app.state.service.session_factory) as session:
        keys.revoke_key(session, "revoked", actor="test")
        session.execute(
            update(ApiKey).where(ApiKey.name == "expired").values(expires_at=keys.utcnow() - timedelta(seconds=1))
        )
    for who, sent in headers.items():
        run(who, sent, admin)

    wrong = []
    for row in ROWS:
        for who in WHO:
            key = (row.url + " " + row.method, who)
            if seen[key] != expected(row, who):
                wrong.append(f"{row.method} {row.url} as {who}: {seen[key]}, expected {expected(row, who)}")
            if seen[key] == 403:
                assert f"{row.dataset or 'admin'}:{row.level}" in details[key] or (
                    row.level == "admin" and "scope admin" in details[key]
                ), details[key]
                assert "other" not in details[key].replace("another", ""), details[key]
            if seen[key] == 401:
                assert details[key].endswith("} Bearer"), details[key]
    assert not wrong, "\n".join(wrong)


def test_401_says_how_and_asks_for_bearer(client, products):
    make_key(client, "admin", ["admin"])
    response = client.get("/datasets/shop")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.json()["detail"]
    assert "llmatch keys create" in response.json()["detail"]
    malformed = client.get("/datasets/shop", headers={"Authorization": "Basic abc"})
    assert malformed.status_code == 401


def test_listing_shows_only_readable_datasets(client, products):
    for name in ("alpha", "beta", "gamma"):
        assert client.put(f"/datasets/{name}", json={}).status_code == 201
    reader = bearer(make_key(client, "reader", ["alpha:read", "beta:write", "gamma:manage"]))
    listed = client.get("/datasets", headers=reader)
    assert listed.status_code == 200
    assert [d["name"] for d in listed.json()["datasets"]] == ["alpha"]
    admin = bearer(make_key(client, "admin", ["admin"]))
    assert [d["name"] for d in client.get("/datasets", headers=admin).json()["datasets"]] == [
        "alpha",
        "beta",
        "gamma",
        "shop",
    ]
    # Another dataset's name never appears, whether it exists or not: the same 403 for both.
    exists = client.get("/datasets/shop", headers=reader)
    missing = client.get("/datasets/nosuch", headers=reader)
    assert (exists.status_code, missing.status_code) == (403, 403)
    assert exists.json()["detail"].replace("shop", "X") == missing.json()["detail"].replace("nosuch", "X")


def test_body_dataset_is_checked_after_parsing(client, products):
    """POST routes name their dataset in the body: the scope is checked on it, and an unparsable body is
    refused by validation without revealing anything."""
    make_key(client, "admin", ["admin"])
    other = bearer(make_key(client, "other", ["other:read", "other:write"]))
    body = {"dataset": "shop", "record": INLINE, "k": 2}
    response = client.post("/candidates", json=body, headers=other)
    assert response.status_code == 403 and "shop:read" in response.json()["detail"]
    response = client.post("/records", json=records_body("shop", "a", [("z", {"n": 1})]), headers=other)
    assert response.status_code == 403 and "shop:write" in response.json()["detail"]
    response = client.post("/candidates", content=b"{not json", headers={**other, "content-type": "application/json"})
    assert response.status_code == 400
    response = client.post("/candidates", json={"record": INLINE}, headers=other)
    assert response.status_code == 422


def _elsewhere(row: Row) -> list[tuple[str, str, dict[str, Any]]]:
    """Requests that name 'shop' somewhere other than the route's own place, which names 'mine': in the query
    string (alone, repeated, empty, malformed) and in the JSON body where the route reads one."""
    natural = row.dataset or ""
    url = row.url.replace(f"/{natural}", "/mine").replace(f"dataset={natural}", "dataset=mine")
    body = row.kwargs.get("json")
    body = None if body is None else json.loads(json.dumps(body).replace(f'"{natural}"', '"mine"'))
    kwargs = {} if body is None else {"json": body}
    join = "&" if "?" in url else "?"
    variants = [
        ("its own place", row.url, row.kwargs),
        ("query", f"{url}{join}dataset=shop", kwargs),
        ("query, repeated", f"{url}{join}dataset=mine&dataset=shop", kwargs),
        ("query, empty", f"{url}{join}dataset=", kwargs),
        ("query, malformed", f"{url}{join}dataset=%C2%B2", kwargs),
    ]
    if body is not None:
        variants += [
            ("body", url, {"json": {**body, "dataset": "shop"}}),
            ("body, not a string", url, {"json": {**body, "dataset": ["shop"]}}),
            ("body, empty", url, {"json": {**body, "dataset": ""}}),
        ]
    return variants


def _snapshot(client: TestClient, admin: dict[str, str]) -> list[Any]:
    """What a caller could change in dataset 'shop': configuration, counts, records, labels, entities."""
    described = client.get("/datasets/shop", headers=admin).json()
    described.pop("updated_at", None)
    with client.app.state.service.session_factory() as session:
        records = session.execute(
            select(Record.source, Record.external_id, Record.attributes, Record.status).order_by(Record.id)
        ).all()
    labels = client.get("/datasets/shop/labels", headers=admin).json()
    return [described, [tuple(r) for r in records], labels]


def test_a_key_reaches_no_dataset_it_lacks_wherever_the_name_travels(client, products):
    """For every per-dataset route and every place a dataset name can travel (path, query, body), a key that
    holds every scope of 'mine' but none of 'shop' gets 403 and 'shop' is left as it was."""
    assert client.put("/datasets/mine", json={}).status_code == 201
    assert client.post("/records", json=records_body("mine", "a", [("x", {"name": "x"})])).status_code == 202
    admin = bearer(make_key(client, "admin", ["admin"]))
    mine = bearer(make_key(client, "mine", ["mine:read", "mine:write", "mine:manage"]))
    before = _snapshot(client, admin)
    rows = [row for row in ROWS if row.level in LEVEL_OF]
    routes = {f"{row.method} {row.url.split('?')[0]}" for row in rows}
    assert routes >= {"POST /records", "POST /match", "POST /candidates"}
    wrong = []
    for row in rows:
        for where, url, kwargs in _elsewhere(row):
            response = client.request(row.method, url, headers=mine, **kwargs)
            if response.status_code != 403:
                wrong.append(f"{row.method} {url} ({where}): {response.status_code} {response.text[:200]}")
            elif not any(f"{name}:{row.level}" in response.text for name in (row.dataset, "shop", "DATASET")):
                wrong.append(f"{row.method} {url} ({where}): 403 naming no scope: {response.text[:200]}")
    assert not wrong, "\n".join(wrong)
    assert _snapshot(client, admin) == before


def test_a_request_naming_two_datasets_is_refused(client, products):
    """A key that may act on both datasets still cannot name one in the query and another in the body."""
    assert client.put("/datasets/mine", json={}).status_code == 201
    both = bearer(make_key(client, "both", ["mine:read", "mine:write", "shop:read", "shop:write"]))
    body = records_body("shop", "a", [("planted", {"name": "planted"})])
    response = client.post("/records?dataset=mine", json=body, headers=both)
    assert response.status_code == 422 and "more than one dataset" in response.json()["detail"]
    assert client.get("/records/shop/a/planted", headers=both).status_code == 404
    same = client.post("/records?dataset=shop", json=body, headers=both)
    assert same.status_code == 202


def _raw_post(app: Any, headers: list[tuple[bytes, bytes]], chunks: int) -> tuple[int, int]:
    """POST /records straight into the ASGI app with a body of ``chunks`` 64 KiB chunks: (status, chunks read)."""
    reads = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b" " * 65536, "more_body": reads < chunks}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/records",
        "raw_path": b"/records",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    anyio.run(app, scope, receive, send)
    return sent[0]["status"], reads


def test_a_body_without_a_valid_key_is_refused_unread(client, products):
    """No key, or an unknown one, with a 16 MiB body: 401 before a byte of the body is read."""
    make_key(client, "admin", ["admin"])
    length = [(b"content-length", str(16 * 2**20).encode())]
    assert _raw_post(client.app, length, chunks=256) == (401, 0)
    unknown = [(b"authorization", b"Bearer llm_" + b"x" * 43)]
    assert _raw_post(client.app, length + unknown, chunks=256) == (401, 0)
    assert _raw_post(client.app, [(b"transfer-encoding", b"chunked")], chunks=256) == (401, 0)
    # A known key's body is read (and here refused as the JSON it is not).
    writer = [(b"authorization", f"Bearer {make_key(client, 'writer', ['shop:write'])}".encode())]
    status, reads = _raw_post(client.app, [(b"content-length", str(4 * 65536).encode()), *writer], chunks=4)
    assert (status, reads) == (400, 4)


def test_liveness_never_waits_for_the_key_cache(client, products):
    """With keys on and the cache due for a reload, /healthz answers without reloading it (a reload reads the
    database and queues for a thread), while a request that needs a key still reloads it."""
    key = bearer(make_key(client, "admin", ["admin"]))
    cache = client.app.state.service.keys
    cache.refresh()
    reloads: list[float] = []
    real_refresh = cache.refresh
    cache.refresh = lambda older_than=0.0: (reloads.append(older_than), real_refresh(older_than))[1]
    cache._loaded_at -= 3600  # due for a reload
    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz", headers={"host": "attacker.example"}).status_code == 200  # auth is on
    assert reloads == []
    assert client.get("/datasets/shop", headers=key).status_code == 200
    assert len(reloads) == 1


def test_without_keys_only_loopback_host_names_are_served(client, settings, counting_pool):
    """Auth off (no key): a request addressed to another host name (DNS rebinding) is refused."""
    for host in ("attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example", "10.0.0.1", ""):
        response = client.put("/datasets/rebound", json={}, headers={"host": host})
        assert response.status_code == 400 and "localhost" in response.json()["detail"], host
    assert client.get("/datasets/rebound").status_code == 404
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "127.0.0.2"):
        assert client.get("/datasets", headers={"host": host}).status_code == 200, host
    assert client.get("/healthz", headers={"host": "attacker.example"}).status_code == 400
    insecure = settings.model_copy(update={"insecure_no_auth": True})
    with TestClient(create_app(insecure, pool=counting_pool, run_worker=False), base_url="http://api.internal") as api:
        assert api.put("/datasets/exposed", json={}).status_code == 201
    key = bearer(make_key(client, "admin", ["admin"]))
    assert client.get("/datasets", headers={"host": "api.example", **key}).status_code == 200


def test_every_route_declares_its_access():
    """Each route has one of auth.Read/Write/Manage/Admin/AnyKey/Public in its signature; a per-dataset one
    can find its dataset (path name/dataset, query dataset, or body field dataset)."""
    app = create_app(Settings(database_url="sqlite://", device="cpu"))
    undeclared, datasetless = [], []
    routes = [c.original_route for c in iter_route_contexts(app.routes) if isinstance(c.original_route, APIRoute)]
    assert len(routes) >= 20, "every route of the service is checked (routers included)"
    for route in routes:
        declared = [d for d in route.dependant.dependencies if d.call in (auth.authorize, auth.public)]
        if len(declared) != 1:
            undeclared.append(f"{sorted(route.methods)} {route.path}")
            continue
        scopes = declared[0].own_oauth_scopes or []
        if set(scopes) & set(keys.LEVELS):
            names = {p.name for p in route.dependant.path_params + route.dependant.query_params}
            body = {
                f for p in route.dependant.body_params for f in getattr(p.field_info.annotation, "model_fields", {})
            }
            if not ({"name", "dataset"} & names or "dataset" in body):
                datasetless.append(route.path)
    assert not undeclared, f"routes without auth.Read/Write/Manage/Admin/AnyKey/Public: {undeclared}"
    assert not datasetless, f"per-dataset scope but no dataset parameter: {datasetless}"
    schema = app.openapi()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/datasets/{name}"]["get"]["security"] == [{"HTTPBearer": ["read"]}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


# ------------------------------------------------------------------------------------- the key cache


def test_keys_are_cached_and_last_use_written_lazily(settings, counting_pool, tmp_path):
    cached = settings.model_copy(update={"auth_cache_seconds": 60})
    with TestClient(create_app(cached, pool=counting_pool, run_worker=False), base_url="http://localhost") as client:
        state = client.app.state.service
        key = make_key(client, "admin", ["admin"])
        client.app.state.service.keys.refresh()
        lookups: list[str] = []

        def count(_conn, _cursor, statement, *_args) -> None:
            if "api_keys" in statement:
                lookups.append(statement)

        event.listen(state.engine, "before_cursor_execute", count)
        try:
            for _ in range(20):
                assert client.get("/datasets", headers=bearer(key)).status_code == 200
        finally:
            event.remove(state.engine, "before_cursor_execute", count)
        assert lookups == [], lookups

        client.app.state.service.keys.refresh()
        with state.session_factory() as session:
            first = session.scalar(select(ApiKey.last_used_at).where(ApiKey.name == "admin"))
        assert first is not None
        assert client.get("/datasets", headers=bearer(key)).status_code == 200
        client.app.state.service.keys.refresh()
        with state.session_factory() as session:
            again = session.scalar(select(ApiKey.last_used_at).where(ApiKey.name == "admin"))
        assert again == first, "last-used time written again within a minute"

        # A key made after the last refresh works at once (an unknown key triggers a reload, at most once a second).
        client.app.state.service.keys._loaded_at -= 2
        fresh = make_key(client, "fresh", ["shop:read"])
        assert client.get("/datasets", headers=bearer(fresh)).status_code == 200


def test_ingest_client_sends_its_key(client):
    """`llmatch ingest --key` (llmatch.client): refused without the key, accepted with a DATASET:write key."""
    assert client.put("/datasets/shop", json={}).status_code == 201
    writer = make_key(client, "loader", ["shop:write"])
    rows = [{"id": str(i), "attributes": {"name": f"product {i}"}} for i in range(5)]
    with pytest.raises(IngestError, match="401"):
        ingest_records("", "shop", "a", rows, client=client)
    totals = ingest_records("", "shop", "a", rows, batch_size=2, client=client, api_key=writer)
    assert totals["accepted"] == 5 and totals["created"] == 5


def test_database_outage_keeps_the_loaded_keys(client, products):
    """Keys already loaded keep working while the database is away; with none loaded yet: 503, not a 500."""
    key = make_key(client, "admin", ["admin"])
    cache = client.app.state.service.keys
    cache.refresh()

    def unreachable():
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    cache.session_factory, cache._loaded_at = unreachable, cache._loaded_at - 3600
    assert client.get("/datasets/shop", headers=bearer(key)).status_code == 200
    client.app.state.service.keys = KeyCache(unreachable, 5)
    response = client.get("/datasets/shop", headers=bearer(key))
    assert response.status_code == 503 and "API keys cannot be checked" in response.json()["detail"]


def test_revoking_every_key_locks_rather_than_opens(client, products):
    key = make_key(client, "only", ["admin"])
    with transaction(client.app.state.service.session_factory) as session:
        keys.revoke_key(session, "only", actor="test")
    assert client.get("/datasets").status_code == 401
    assert client.get("/datasets", headers=bearer(key)).status_code == 401


# --------------------------------------------------------------------------------------- audit trail


def test_changes_are_audited_with_the_key_name_and_counted(client, products):
    admin = bearer(make_key(client, "ops-admin", ["admin"]))
    manager = bearer(make_key(client, "shop-manager", ["shop:manage", "shop:write"]))
    assert client.put("/datasets/shop", json={"serialization": "plain"}, headers=manager).status_code == 200
    assert client.delete("/records/shop/a/a4", headers=manager).status_code == 204
    assert client.delete("/datasets/shop/labels", headers=manager).status_code == 204
    assert client.put("/datasets/tmp", json={}, headers=admin).status_code == 201
    assert client.delete("/datasets/tmp", headers=admin).status_code == 204
    with client.app.state.service.session_factory() as session:
        events = session.execute(select(AuditEvent.actor, AuditEvent.action, AuditEvent.target)).all()
    assert ("test", "key.create", "ops-admin") in events
    assert ("shop-manager", "dataset.configure", "shop") in events
    assert ("shop-manager", "record.delete", "shop/a/a4") in events
    assert ("shop-manager", "labels.delete", "shop") in events
    assert ("ops-admin", "dataset.create", "tmp") in events
    assert ("ops-admin", "dataset.delete", "tmp") in events

    assert client.get("/metrics", headers=manager).status_code == 403
    text = client.get("/metrics", headers=admin).text
    assert re.search(r'llmatch_audit_events_total\{action="dataset.delete"\} 1\.0', text), text[-2000:]
    assert re.search(r'llmatch_audit_events_total\{action="key.create"\} 2\.0', text)
    assert re.search(r'llmatch_auth_failures_total\{status="403"\} [1-9]', text)


# ------------------------------------------------------------------------------------------------ leaks

PATHISH = re.compile(r"Traceback|site-packages|\.py\b|(?<![\w.])/(tmp|home|usr|opt|var|work|root|srv|models)/")


def test_encoder_errors_name_no_server_path(client, counting_pool, tmp_path):
    folder = tmp_path / "secret-model-folder"
    folder.mkdir()
    counting_pool.add(EncoderSpec("vanishing", "sentence-transformers", str(folder)))
    assert client.put("/datasets/v", json={"encoder": "vanishing"}).status_code == 201
    folder.rmdir()
    refused = client.put("/datasets/w", json={"encoder": "vanishing"})
    inline = client.post("/candidates", json={"dataset": "v", "record": INLINE})
    assert (refused.status_code, inline.status_code) == (422, 503)
    for response in (refused, inline):
        assert "does not exist" in response.json()["detail"]
        assert "secret-model-folder" not in response.text and not PATHISH.search(response.text), response.text


def test_failed_records_show_their_error_without_server_paths(client, products):
    error = "OSError: [Errno 2] No such file or directory: '/srv/models/secret-model/config.json'"
    with transaction(client.app.state.service.session_factory) as session:
        session.execute(
            update(Record).where(Record.external_id == "a4").values(status="failed", error=error, embedding_id=None)
        )
    shown = client.get("/records/shop/a/a4").json()["error"]
    assert shown == "OSError: [Errno 2] No such file or directory: '<path>'"
    response = client.get("/match?dataset=shop&left_source=a&left_id=a4&right_source=b&right_id=b1")
    assert response.status_code == 409 and "No such file or directory" in response.json()["detail"]
    assert "secret-model" not in response.text and not PATHISH.search(response.text), response.text


def test_inline_queries_reuse_only_their_own_datasets_vectors(client, products, counting_pool):
    """A text stored in dataset 'shop' is encoded afresh when another dataset asks for it inline (reusing shop's
    vector would answer faster and so reveal it); 'shop' itself reuses it."""
    assert client.put("/datasets/elsewhere", json={}).status_code == 201
    stored = {"attributes": dict(PRODUCTS_A[0][1])}
    before = len(counting_pool.calls)
    assert client.post("/candidates", json={"dataset": "elsewhere", "record": stored}).status_code == 200
    assert len(counting_pool.calls) == before + 1, "another dataset's vector was reused"
    assert client.post("/candidates", json={"dataset": "shop", "record": stored}).status_code == 200
    assert len(counting_pool.calls) == before + 1, "the dataset's own vector was not reused"


# ------------------------------------------------------------------------------ commands and start-up


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmatch.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMATCH_")}
    return {**env, "LLMATCH_DATABASE_URL": url, "LLMATCH_DATA_DIR": str(tmp_path / "data")}


def test_keys_commands(cli_env, tmp_path):
    created = _cli(
        cli_env,
        "keys",
        "create",
        "--name",
        "ingester",
        "--scope",
        "shop:write",
        "--scope",
        "shop:read",
        "--expires",
        "30",
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"llm_[A-Za-z0-9_-]{43}", key), created.stdout
    listed = _cli(cli_env, "keys", "list")
    assert listed.returncode == 0 and "ingester" in listed.stdout and "shop:write shop:read" in listed.stdout
    assert key not in listed.stdout and keys.hash_key(key) not in listed.stdout
    engine = make_engine(cli_env["LLMATCH_DATABASE_URL"])
    with engine.connect() as connection:
        stored = connection.execute(select(ApiKey.key_hash, ApiKey.expires_at)).one()
    engine.dispose()
    assert stored.key_hash == keys.hash_key(key) and stored.expires_at is not None

    duplicate = _cli(cli_env, "keys", "create", "--name", "ingester", "--scope", "admin")
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    bad_scope = _cli(cli_env, "keys", "create", "--name", "x", "--scope", "shop:delete")
    assert bad_scope.returncode == 1 and "DATASET:read|write|manage" in bad_scope.stderr
    revoked = _cli(cli_env, "keys", "revoke", "ingester")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert "revoked" in _cli(cli_env, "keys", "list").stdout
    assert _cli(cli_env, "keys", "revoke", "nobody").returncode == 1


def test_serve_refuses_a_public_address_without_a_key(cli_env):
    refused = _cli(cli_env, "serve", "--host", "0.0.0.0", "--port", "8765")
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "llmatch keys create" in refused.stderr and "--insecure-no-auth" in refused.stderr


def test_serve_check_policy(cli_env, tmp_path, caplog):
    settings = Settings(database_url=cli_env["LLMATCH_DATABASE_URL"], data_dir=tmp_path / "data")
    with caplog.at_level("INFO", logger="llmatch.auth"):
        assert auth.serve_check(settings, "127.0.0.1", False) is None
    assert "auth is OFF" in caplog.text
    assert auth.serve_check(settings, "::1", False) is None
    assert "llmatch keys create" in auth.serve_check(settings, "0.0.0.0", False)
    assert auth.serve_check(settings, "0.0.0.0", True) is None
    # A deployment's admin key (a secret file) turns auth on before the check.
    secret = tmp_path / "admin_key"
    secret.write_text(keys.new_key() + "\n")
    deployed = settings.model_copy(update={"admin_key_file": secret})
    assert auth.serve_check(deployed, "0.0.0.0", False) is None
    assert auth.serve_check(settings, "0.0.0.0", False) is None  # the key now exists
    short = settings.model_copy(update={"admin_key_file": tmp_path / "missing"})
    assert "LLMATCH_ADMIN_KEY_FILE" in auth.serve_check(short, "0.0.0.0", False)
