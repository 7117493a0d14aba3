"""HTTP and queue metrics for ``/metrics`` (Prometheus text format)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Receive, Scope, Send

from llmatch.models import AuditEvent, Record

REQUESTS = Counter("llmatch_http_requests_total", "HTTP requests.", ["method", "route", "status"])
LATENCY = Histogram(
    "llmatch_http_request_seconds",
    "HTTP request latency.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class MetricsMiddleware:
    """Counts requests and their latency by route template (not raw path, to bound label values)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            LATENCY.labels(scope["method"], template).observe(time.perf_counter() - started)
            REQUESTS.labels(scope["method"], template, str(status["code"])).inc()


class QueueCollector(Collector):
    """Records per status and dataset, read from the database at scrape time."""

    def __init__(self):
        self.session_factory = None

    def collect(self):
        family = GaugeMetricFamily("llmatch_records", "Stored records by status.", labels=["status"])
        if self.session_factory is not None:
            try:
                with self.session_factory() as session:
                    rows = session.execute(select(Record.status, func.count()).group_by(Record.status)).all()
                counts = dict(rows)
                for status in ("pending", "encoded", "failed"):
                    family.add_metric([status], counts.get(status, 0))
            except Exception:  # noqa: BLE001 - a scrape must not fail because the database is away
                pass
        yield family


QUEUE = QueueCollector()
REGISTRY.register(QUEUE)

AUTH_FAILURES = Counter("llmatch_auth_failures_total", "Requests refused by access control.", ["status"])


class AuditCollector(Collector):
    """Audit events by action (``llmatch_audit_events_total``), counted from the audit table at scrape time so
    that every process's events (the API's and the command line's key operations) are included."""

    def __init__(self):
        self.session_factory = None

    def collect(self):
        family = CounterMetricFamily("llmatch_audit_events", "Audited changes by action.", labels=["action"])
        if self.session_factory is not None:
            try:
                with self.session_factory() as session:
                    rows = session.execute(select(AuditEvent.action, func.count()).group_by(AuditEvent.action))
                    for action, count in rows:
                        family.add_metric([action], count)
            except Exception:  # noqa: BLE001 - a scrape must not fail because the database is away
                pass
        yield family


AUDIT = AuditCollector()
REGISTRY.register(AUDIT)
