"""Operations: liveness, readiness, Prometheus metrics.

Liveness and readiness are ``async`` routes: they run on the event loop, never queue behind the thread pool
that inline encodes occupy, and do their only blocking call (the database check) in a thread with a timeout."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from service import auth
from service.health import DatabaseProbe, readiness

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: str


class FollowerState(BaseModel):
    alive: bool
    lag_seconds: float | None


class WorkerState(BaseModel):
    alive: bool


class Readiness(BaseModel):
    status: str
    checks: dict[str, bool]
    index_follower: FollowerState
    encoder_worker: WorkerState | None
    process: int = Field(description="The API process that answered (`llmatch serve --workers N` runs several).")
    detail: str | None = None


@router.get("/healthz", response_model=Health)
async def healthz(_: auth.Public) -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready; `detail` says what is wrong."}},
)
async def readyz(request: Request, _: auth.Public) -> JSONResponse:
    """Ready when the database answers, the indexes are loaded, the index follower is alive and current
    (`index_follower.lag_seconds`: since it last applied the change log), and any in-process worker is alive."""
    app_state = request.app.state
    probe = getattr(app_state, "database_probe", None)
    if probe is None or probe.state is not app_state.service:
        probe = app_state.database_probe = DatabaseProbe(app_state.service)
    ready, body = await readiness(app_state.service, probe)
    return JSONResponse(body, status_code=200 if ready else 503)


METRICS_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


@router.get("/metrics", response_class=Response, responses=METRICS_RESPONSE)
def metrics(_: auth.Admin) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
