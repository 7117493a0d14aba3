"""The audit lines that changes and key operations write: one line each, whatever the values hold."""

from __future__ import annotations

import logging
from urllib.parse import quote

import pytest
from conftest import PRODUCTS_A, records_body
from sqlalchemy import select

from llmatch.db import transaction
from llmatch.models import AuditEvent
from service import audit

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
