"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import State

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: State) -> JSONResponse:
    """Ready when the database answers and the indexes are loaded."""
    checks = {"database": state.database_ok(), "indexes": state.registry.loaded}
    ready = all(checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    if not ready:
        body["detail"] = "Not ready: " + ", ".join(name for name, ok in checks.items() if not ok) + " unavailable."
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
