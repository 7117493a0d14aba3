"""Access control: ``Authorization: Bearer <key>`` with scopes ``admin`` and ``DATASET:read|write|manage``.

Two steps. ``AuthGate`` (a middleware, outside the routes) authenticates the key before any body is read: a
request that carries a body without a valid key is answered 401 at once, so an unauthenticated caller can
never make the server read, buffer or parse a body. While auth is off it also refuses host names that are not
loopback (a page on another site cannot reach the service through DNS rebinding).

Then every route declares what it needs with one parameter in its signature:

    def get_thing(name: DatasetPath, state: State, access: auth.Read) -> ...   # needs DATASET:read

``auth.Read``, ``auth.Write`` and ``auth.Manage`` check the scope for **every** dataset the request names: the
path parameter ``name`` or ``dataset``, each query parameter ``dataset`` and the JSON body's ``dataset``. Each
value is checked as it is, malformed or empty ones included (no key holds a scope for those, so they are 403);
a request that names two different datasets is refused (422), so a handler always acts on the dataset that
was authorized, wherever it reads the name. ``auth.Admin`` needs ``admin``; ``auth.AnyKey`` any valid key (then
filter with ``access.can(dataset, "read")``, as GET /datasets does); ``auth.Public`` needs none (health checks,
the /ui page). ``access.actor`` names the key for the audit trail. tests/test_access.py fails for a route
that declares none of these, and for any place a dataset name can travel that escapes the check.

Auth is on once any key exists (revoked ones included); until then every request is allowed, which
``llmatch serve`` permits only on a loopback address (or with ``--insecure-no-auth``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from llmatch.db import make_engine, make_session_factory
from llmatch.settings import Settings
from service import audit
from service.errors import ApiError, ServiceUnavailable, Unprocessable
from service.keys import (
    ADMIN,
    LEVELS,
    KeyCache,
    KeyProblem,
    any_key_exists,
    ensure_configured_admin_key,
    utcnow,
)
from service.metrics import AUTH_FAILURES

log = logging.getLogger("llmatch.auth")

DATASET = re.compile(r"^[a-z0-9_-]{1,64}$")
ANY_KEY = "any-key"

bearer = HTTPBearer(auto_error=False, description="An API key made with `llmatch keys create`.")


@dataclass(frozen=True)
class Access:
    """Who is calling: a key's name and scopes, or nobody while auth is off (then everything is allowed)."""

    key: str | None
    scopes: frozenset[str]

    @property
    def actor(self) -> str:
        return self.key or audit.LOCAL

    @property
    def admin(self) -> bool:
        return self.key is None or ADMIN in self.scopes

    def can(self, dataset: str, level: str) -> bool:
        return self.admin or f"{dataset}:{level}" in self.scopes

    def require(self, dataset: str, level: str) -> None:
        """403 naming the missing scope unless this key holds ``DATASET:level`` (or ``admin``)."""
        if not self.can(dataset, level):
            raise forbidden(_scope_name(dataset, level))


OPEN = Access(key=None, scopes=frozenset())


def unauthorized(detail: str) -> HTTPException:
    AUTH_FAILURES.labels("401").inc()
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def forbidden(scope: str) -> HTTPException:
    AUTH_FAILURES.labels("403").inc()
    return HTTPException(
        status_code=403,
        detail=f"This API key lacks the scope {scope} that this request needs; use a key that has it (or admin).",
    )


async def authorize(
    request: Request,
    security_scopes: SecurityScopes,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Access:
    """The gate's verdict on the key (401), then the scope the route declares for every dataset named (403)."""
    access = await _authenticated(request, credentials)
    level = security_scopes.scopes[-1] if security_scopes.scopes else ANY_KEY
    if level == ADMIN:
        if not access.admin:
            raise forbidden(ADMIN)
    elif level in LEVELS:
        named = await datasets_named(request)
        for dataset in named:
            access.require(dataset, level)
        if len(set(named)) > 1:
            raise Unprocessable(
                "This request names more than one dataset (in its path, query string or body); name the one "
                "it acts on, the same everywhere."
            )
    return access


async def _authenticated(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Access:
    """What ``AuthGate`` decided for this request (authenticating here only where no gate ran)."""
    verdict = request.scope.get("state", {}).get(GATE_VERDICT)
    if isinstance(verdict, Access):
        return verdict
    if isinstance(verdict, Exception):
        raise verdict
    return await authenticate(request.app.state.service.keys, credentials)


async def authenticate(cache: KeyCache, credentials: HTTPAuthorizationCredentials | None) -> Access:
    if cache.stale():
        try:
            await run_in_threadpool(cache.refresh, cache.refresh_seconds)
        except SQLAlchemyError:
            if not cache.loaded:
                raise ServiceUnavailable("The database is unreachable, so API keys cannot be checked; retry.") from None
            log.warning("could not reload API keys; using the ones loaded before", exc_info=True)
    if not cache.auth_on:
        return OPEN
    if credentials is None or not credentials.credentials:
        raise unauthorized(
            "This API needs a key: send the header Authorization: Bearer <key> (an administrator creates keys "
            "with `llmatch keys create`)."
        )
    info = cache.lookup(credentials.credentials)
    if info is None and cache.may_refresh_on_miss():  # perhaps a key created since the last refresh
        await run_in_threadpool(cache.refresh, cache.miss_refresh_seconds)
        info = cache.lookup(credentials.credentials)
    if info is None:
        raise unauthorized("Unknown API key; check the key you send (keys are made with `llmatch keys create`).")
    if info.revoked:
        raise unauthorized("This API key has been revoked; ask an administrator for a new one.")
    if info.expires_at is not None and info.expires_at <= utcnow():
        expired = info.expires_at.isoformat(timespec="seconds")
        raise unauthorized(f"This API key expired at {expired} UTC; ask an administrator for a new one.")
    cache.used(info.name)
    return Access(key=info.name, scopes=info.scopes)


async def datasets_named(request: Request) -> list[str]:
    """Every dataset name the request carries, as sent: path ``name``/``dataset``, each query ``dataset``, and
    the JSON body's ``dataset`` where the route reads a body (a value that is not a string is shown as JSON)."""
    named = [str(request.path_params[name]) for name in ("name", "dataset") if name in request.path_params]
    named += request.query_params.getlist("dataset")
    route = request.scope.get("route")
    if getattr(route, "body_field", None) is not None:
        try:
            body = await request.json()  # FastAPI parsed it before solving dependencies; this reads its cache
        except Exception:  # noqa: BLE001 - not JSON: the route's validation refuses it
            body = None
        if isinstance(body, dict) and "dataset" in body:
            value = body["dataset"]
            named.append(value if isinstance(value, str) else json.dumps(value)[:80])
    return named


def _scope_name(dataset: str, level: str) -> str:
    """The scope as a 403 may name it: a malformed dataset name is not echoed back."""
    return f"{dataset}:{level}" if DATASET.match(dataset) else f"DATASET:{level} (for a valid dataset name)"


async def public() -> None:
    """Declares a route that needs no key."""


Read = Annotated[Access, Security(authorize, scopes=["read"])]
Write = Annotated[Access, Security(authorize, scopes=["write"])]
Manage = Annotated[Access, Security(authorize, scopes=["manage"])]
Admin = Annotated[Access, Security(authorize, scopes=[ADMIN])]
AnyKey = Annotated[Access, Security(authorize)]
Public = Annotated[None, Depends(public)]


# ------------------------------------------------------------------------------------------------ the gate

GATE_VERDICT = "llmatch_access"  # request.state key: the gate's Access, or the HTTPException to answer with


class AuthGate:
    """Authenticate before anything reads the body. A body sent without a valid key is refused at once (401,
    or 503 while keys cannot be checked) and never read. A bodiless request is left to ``authorize`` on the
    routes that need a key, so public ones (``/healthz``) never wait here for the key cache to reload. While
    auth is off, only loopback host names are served unless ``insecure_no_auth`` says the operator chose it."""

    def __init__(self, app: ASGIApp, insecure_no_auth: bool = False):
        self.app = app
        self.insecure_no_auth = insecure_no_auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        state = getattr(scope["app"].state, "service", None)
        if state is None:  # the lifespan has not run: nothing to check keys against; authorize answers
            await self.app(scope, receive, send)
            return
        cache: KeyCache = state.keys
        foreign = not self.insecure_no_auth and not is_loopback_host(headers.get("host", ""))
        open_as_loaded = cache.loaded and not cache.auth_on
        if _has_body(headers) or not cache.loaded or (foreign and open_as_loaded and cache.stale()):
            try:
                verdict: Access | Exception = await authenticate(cache, _credentials(headers))
            except (HTTPException, ApiError) as refusal:
                verdict = refusal
            if isinstance(verdict, Exception) and _has_body(headers):
                await _answer_refusal(send, verdict)
                return
            scope.setdefault("state", {})[GATE_VERDICT] = verdict
            auth_off = verdict is OPEN
        else:  # no body: the route authenticates if it needs a key; liveness never waits for the database here
            auth_off = open_as_loaded
        if auth_off and foreign:
            await _answer(send, 400, _NOT_LOOPBACK)
            return
        await self.app(scope, receive, send)


_NOT_LOOPBACK = (
    "While no API key exists the service answers only requests addressed to localhost or a loopback address; "
    "create a key with `llmatch keys create` to serve it under other host names."
)


def _credentials(headers: Headers) -> HTTPAuthorizationCredentials | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip())


def _has_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers


def is_loopback_host(host_header: str) -> bool:
    """Whether a Host header names this machine: ``localhost`` or a loopback address, with or without a port."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return host == "localhost" or is_loopback(host)


async def _answer_refusal(send: Send, refusal: Exception) -> None:
    if isinstance(refusal, HTTPException):
        await _answer(send, refusal.status_code, str(refusal.detail), dict(refusal.headers or {}))
    else:
        assert isinstance(refusal, ApiError)
        await _answer(send, refusal.status_code, refusal.detail)


async def _answer(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------- `llmatch serve` start-up


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def configured_admin_key(settings: Settings) -> str | None:
    """The admin key the settings carry (``LLMATCH_ADMIN_KEY`` or the file ``LLMATCH_ADMIN_KEY_FILE``)."""
    if settings.admin_key is not None:
        return settings.admin_key.get_secret_value().strip() or None
    if settings.admin_key_file is not None:
        try:
            return settings.admin_key_file.read_text().strip() or None
        except OSError as error:
            raise KeyProblem(f"cannot read LLMATCH_ADMIN_KEY_FILE ({error.strerror})") from None
    return None


def serve_check(settings: Settings, host: str, insecure_no_auth: bool) -> str | None:
    """Before serving: store the configured admin key, then say why serving must not start (or None), and
    log whether auth is on."""
    engine = make_engine(settings.resolved_database_url)
    try:
        factory = make_session_factory(engine)
        admin_key = configured_admin_key(settings)
        if admin_key is not None:
            done = ensure_configured_admin_key(factory, settings.admin_key_name, admin_key)
            log.info("admin key %r from the settings: %s", settings.admin_key_name, done)
        with factory() as session:
            keys = any_key_exists(session)
    except KeyProblem as problem:
        return str(problem)
    finally:
        engine.dispose()
    if keys:
        log.info("auth is on: requests need Authorization: Bearer <key>")
        return None
    if is_loopback(host):
        log.warning(
            "auth is OFF: no API key exists; serving on loopback %s only (`llmatch keys create` turns it on)", host
        )
        return None
    if insecure_no_auth:
        log.warning(
            "auth is OFF on %s (--insecure-no-auth): anyone who reaches the port can change every dataset", host
        )
        return None
    return (
        f"refusing to serve on {host} without an API key: anyone who reaches the port could read and change every "
        "dataset. Create one with `llmatch keys create --name admin --scope admin` (and send it as "
        "Authorization: Bearer <key>), or pass --insecure-no-auth to serve without authentication"
    )
