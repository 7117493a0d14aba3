"""Audit trail: configuration changes, deletions, calibrations and key operations, with the key that made
them. Each event is a row in ``audit_events`` (written in the caller's transaction), a log line, and counted
in ``/metrics`` as ``llmatch_audit_events_total`` (read from the table, so key operations made with the
command line are counted too)."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from llmatch.models import AuditEvent

log = logging.getLogger("llmatch.audit")

LOCAL = "local"  # the actor while auth is off (no key exists, loopback only)


def printable(text: str) -> str:
    """``text`` for a log line: backslashes and characters that are not printable (newlines, escape codes,
    direction overrides) written as Python escapes, so a value from a request cannot start or forge a line."""
    return "".join(
        char if char.isprintable() and char != "\\" else char.encode("unicode_escape").decode("ascii") for char in text
    )


def record(session: Session, actor: str, action: str, target: str, details: dict[str, Any] | None = None) -> None:
    """Note that ``actor`` (a key's name) did ``action`` (e.g. ``dataset.delete``) to ``target``. The row keeps
    the values as given; the log line escapes them (``printable``)."""
    session.add(AuditEvent(actor=actor, action=action, target=target[:256], details=details))
    # The details are shown as their repr, which escapes what is not printable in the strings they hold.
    shown = f" {details!r}" if details else ""
    log.info("audit: %s %s by %s%s", printable(action), printable(target), printable(actor), shown)
