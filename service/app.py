"""The FastAPI application: routes over the service state, errors in the contract's shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from encoding.registry import EncoderPool, EncoderUnavailableError
from llmatch.settings import Settings, get_settings
from matching.index_sync import IndexSynchronizer
from service import metrics, openapi
from service.auth import AuthGate
from service.errors import ApiError, ServiceUnavailable, install_error_handlers, log
from service.routes import datasets, decisions, entities, labels, learning, ops, pairs, records
from service.routes import ui as ui_routes
from service.state import ServiceState


def create_app(
    settings: Settings | None = None,
    *,
    pool: EncoderPool | None = None,
    run_worker: bool = True,
    loaded: IndexSynchronizer | None = None,
    save_indexes: bool = True,
) -> FastAPI:
    """Build the app; the database, indexes (or ``loaded``, see ``ServiceState.open``) and optionally an
    in-process worker start with it."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = state = ServiceState.open(
            settings, pool=pool, run_worker=run_worker, loaded=loaded, save_indexes=save_indexes
        )
        state.start()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(
        title="llmatch",
        version="1",
        lifespan=lifespan,
        description="Entity matching with LLM encoders: embed once, match and block by cosine.",
    )
    install_error_handlers(app)

    @app.exception_handler(EncoderUnavailableError)
    async def _encoder_unavailable(request, error: EncoderUnavailableError):
        # The message names the model folder: logged for the operator, never sent to the client.
        log.warning("encoder unavailable: %s", error)
        encoder = str(error).split(":")[0]
        detail = f"{encoder[:1].upper()}{encoder[1:]} is unavailable: its model folder does not exist on the server"
        return await app.exception_handlers[ApiError](
            request, ServiceUnavailable(f"{detail}; an operator must install it.")
        )

    for router in (datasets.router, records.router, decisions.router, ops.router, labels.router, entities.router):
        app.include_router(router)
    app.include_router(pairs.router)
    app.include_router(learning.router)
    app.include_router(ui_routes.router)
    openapi.install(app, settings)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AuthGate, insecure_no_auth=settings.insecure_no_auth)  # runs before the body is read
    app.add_middleware(metrics.MetricsMiddleware)
    return app


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, before reading them."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                await _too_large(send, self.max_bytes)
                return
            receive = _limited(receive, self.max_bytes)
        await self.app(scope, receive, send)


def _limited(receive: Receive, max_bytes: int) -> Receive:
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                # An HTTPException passes through FastAPI's body parsing unchanged (anything else becomes 400).
                raise HTTPException(status_code=413, detail=_too_large_detail(max_bytes))
        return message

    return wrapped


def _too_large_detail(max_bytes: int) -> str:
    return f"Request body exceeds {max_bytes} bytes (LLMATCH_MAX_BODY_BYTES); send fewer records per request."


async def _too_large(send: Send, max_bytes: int) -> None:
    body = json.dumps({"detail": _too_large_detail(max_bytes)})
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})
