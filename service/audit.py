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


def record(session: Session, actor: str, action: str, target: str, details: dict[str, Any] | None = None) -> None:
    """Note that ``actor`` (a key's name) did ``action`` (e.g. ``dataset.delete``) to ``target``."""
    session.add(AuditEvent(actor=actor, action=action, target=target[:256], details=details))
    log.info("audit: %s %s by %s%s", action, target, actor, f" {details}" if details else "")
