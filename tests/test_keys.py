"""`llmatch keys create` through the command line's entry point (expiry, concurrent creation), and the audit
lines key operations and other changes write."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from conftest import PG_ADMIN_URL, PRODUCTS_A, records_body
from sqlalchemy import make_url, select

from llmatch.cli import main
from llmatch.db import make_engine, make_session_factory, transaction
from llmatch.models import ApiKey, AuditEvent
from llmatch.settings import get_settings
from service import audit, keys


@pytest.fixture
def cli_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str) -> Iterator[str]:
    """The command line's settings (read from the environment) pointed at a fresh migrated database."""
    for name in [name for name in os.environ if name.startswith("LLMATCH_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LLMATCH_DATABASE_URL", database_url)
    monkeypatch.setenv("LLMATCH_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield database_url
    get_settings.cache_clear()


def stored_keys(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(ApiKey.name)))
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------------------ audit lines


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The audit log as it is written: every line of every formatted ``llmatch.audit`` record."""
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    return [
        line
        for record in caplog.records
        if record.name == "llmatch.audit"
        for line in formatter.format(record).splitlines()
    ]


def test_audit_lines_escape_control_characters(client, caplog):
    """A record id can hold any character a URL path can carry; those that end or rewrite a line (carriage
    return, NEL, line separator, terminal escapes) are escaped in the log line and kept in the audit table."""
    forged = "x\rINFO llmatch.audit: audit: key.create root by admin\x85\u2028\x1b[2J"
    assert client.put("/datasets/shop", json={}).status_code == 201
    assert client.post("/records", json=records_body("shop", "a", [(forged, {"name": "tv"})])).status_code == 202
    with caplog.at_level(logging.INFO, logger="llmatch.audit"):
        assert client.delete(f"/records/shop/a/{quote(forged, safe='')}").status_code == 204
    lines = audit_lines(caplog)
    assert lines == [
        "INFO llmatch.audit: audit: record.delete shop/a/x\\rINFO llmatch.audit: audit: key.create root by admin"
        "\\x85\\u2028\\x1b[2J by local"
    ], lines
    with client.app.state.service.session_factory() as session:
        targets = list(session.scalars(select(AuditEvent.target).where(AuditEvent.action == "record.delete")))
    assert targets == [f"shop/a/{forged}"]


def test_audit_line_of_a_target_with_a_newline_is_one_line(client, caplog):
    """No route carries a newline in a path today; the audit log must not depend on that."""
    with caplog.at_level(logging.INFO, logger="llmatch.audit"):
        with transaction(client.app.state.service.session_factory) as session:
            audit.record(session, "local", "record.delete", "shop/a/x\nINFO llmatch.audit: audit: forged")
    assert audit_lines(caplog) == [
        "INFO llmatch.audit: audit: record.delete shop/a/x\\nINFO llmatch.audit: audit: forged by local"
    ]
    with client.app.state.service.session_factory() as session:
        assert session.scalar(select(AuditEvent.target)) == "shop/a/x\nINFO llmatch.audit: audit: forged"


def test_audit_lines_keep_backslashes_unambiguous(client, caplog):
    """An id holding a backslash and an r is not shown as one holding a carriage return."""
    assert client.put("/datasets/shop", json={}).status_code == 201
    ids = ["a\\rb", "a\rb"]
    rows = [(record_id, dict(PRODUCTS_A[0][1])) for record_id in ids]
    assert client.post("/records", json=records_body("shop", "a", rows)).status_code == 202
    with caplog.at_level(logging.INFO, logger="llmatch.audit"):
        for record_id in ids:
            assert client.delete(f"/records/shop/a/{quote(record_id, safe='')}").status_code == 204
    lines = audit_lines(caplog)
    assert len(lines) == 2 and lines[0] != lines[1], lines


# ------------------------------------------------------------------------------ concurrent `keys create`


def backends_waiting_on_a_lock(url: str) -> int:
    database = make_url(url).database
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'"
        return admin.execute(query, (database,)).fetchone()[0]


@pytest.mark.parametrize("database_url", ["pg"], indirect=True)
def test_concurrent_keys_create_with_one_name_says_it_exists(cli_database, capsys):
    """A key named "ops" is being created (inserted, not yet committed) while `llmatch keys create --name ops`
    runs: its check finds no such key, its insert waits for the other transaction, which then commits. The
    command must say the name is taken and exit 1, not end in a traceback."""
    engine = make_engine(cli_database)
    outcome: dict[str, object] = {}

    def create() -> None:
        try:
            outcome["status"] = main(["keys", "create", "--name", "ops", "--scope", "admin"])
        except BaseException as error:  # noqa: BLE001 - the test reports what escaped
            outcome["error"] = error

    try:
        with transaction(make_session_factory(engine)) as session:
            keys.create_key(session, "ops", ["shop:read"], actor="test")  # flushed: holds the name, uncommitted
            racer = threading.Thread(target=create)
            racer.start()
            deadline = time.monotonic() + 60
            while backends_waiting_on_a_lock(cli_database) == 0:
                assert racer.is_alive() and time.monotonic() < deadline, f"the command never waited: {outcome}"
                time.sleep(0.05)
        racer.join(60)
    finally:
        engine.dispose()
    assert not racer.is_alive()
    captured = capsys.readouterr()
    assert "error" not in outcome, repr(outcome["error"])
    assert outcome["status"] == 1
    assert "a key named 'ops' already exists" in captured.err, captured.err
    assert "Traceback" not in captured.err and "llm_" not in captured.out
    assert stored_keys(cli_database) == ["ops"]


# ------------------------------------------------------------------------------------ `keys create --expires`


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("days", ["nan", "inf", "-inf", "-1", "0", "1e9", "36501"])
def test_keys_create_refuses_expiry_that_is_not_a_sane_number_of_days(cli_database, capsys, days):
    status = main(["keys", "create", "--name", "ops", "--scope", "admin", f"--expires={days}"])
    captured = capsys.readouterr()
    assert status == 1, captured
    assert "--expires must be a number of days above 0 and at most 36,500" in captured.err, captured.err
    assert "Traceback" not in captured.err and "llm_" not in captured.out
    assert stored_keys(cli_database) == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("days", ["0.5", "36500"])
def test_keys_create_takes_expiry_within_bounds(cli_database, capsys, days):
    assert main(["keys", "create", "--name", "ops", "--scope", "admin", f"--expires={days}"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("llm_")
    assert stored_keys(cli_database) == ["ops"]
