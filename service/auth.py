"""Access control: ``Authorization: Bearer <key>`` with scopes ``admin`` and ``DATASET:read|write|manage``.

Every route declares what it needs with one parameter in its signature:

    def get_thing(name: DatasetPath, state: State, access: auth.Read) -> ...   # needs DATASET:read

``auth.Read``, ``auth.Write`` and ``auth.Manage`` check the scope for the route's dataset, taken from the path
parameter ``name`` or ``dataset``, else the query parameter ``dataset``, else the JSON body's ``dataset``
(already parsed when the check runs). ``auth.Admin`` needs ``admin``; ``auth.AnyKey`` any valid key (then
filter with ``access.can(dataset, "read")``, as GET /datasets does); ``auth.Public`` needs none (health checks,
the /ui page). ``access.actor`` names the key for the audit trail. tests/test_access.py fails for a route
that declares none of these.

Auth is on once any key exists (revoked ones included); until then every request is allowed, which
``llmatch serve`` permits only on a loopback address.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from sqlalchemy.exc import SQLAlchemyError

from llmatch.db import make_engine, make_session_factory
from llmatch.settings import Settings
from service import audit
from service.errors import ServiceUnavailable
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
            raise forbidden(f"{dataset}:{level}")


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
    """Authenticate the key (401), then check the scope the route declares (403)."""
    access = await authenticate(request.app.state.keys, credentials)
    level = security_scopes.scopes[-1] if security_scopes.scopes else ANY_KEY
    if level == ADMIN:
        if not access.admin:
            raise forbidden(ADMIN)
    elif level in LEVELS:
        dataset = await dataset_of(request)
        if dataset is not None:  # None: the request names no valid dataset and validation will refuse it
            access.require(dataset, level)
    return access


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


async def dataset_of(request: Request) -> str | None:
    """The dataset a request is about: path ``name``/``dataset``, query ``dataset``, or the body's ``dataset``."""
    for name in ("name", "dataset"):
        if name in request.path_params:
            return _dataset_name(request.path_params[name])
    if "dataset" in request.query_params:
        return _dataset_name(request.query_params["dataset"])
    try:
        body = await request.json()  # FastAPI parsed it before solving dependencies; this reads its cache
    except Exception:  # noqa: BLE001 - no JSON body: validation answers
        return None
    return _dataset_name(body.get("dataset")) if isinstance(body, dict) else None


def _dataset_name(value: object) -> str | None:
    return value if isinstance(value, str) and DATASET.match(value) else None


async def public() -> None:
    """Declares a route that needs no key."""


Read = Annotated[Access, Security(authorize, scopes=["read"])]
Write = Annotated[Access, Security(authorize, scopes=["write"])]
Manage = Annotated[Access, Security(authorize, scopes=["manage"])]
Admin = Annotated[Access, Security(authorize, scopes=[ADMIN])]
AnyKey = Annotated[Access, Security(authorize)]
Public = Annotated[None, Depends(public)]


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
