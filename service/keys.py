"""API keys: create (shown once, stored as a SHA-256 hash), list, revoke, and the in-memory key cache that
spares a request a database round trip."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from llmatch.db import make_engine, make_session_factory, transaction
from llmatch.models import ApiKey
from llmatch.settings import Settings
from service import audit

log = logging.getLogger("llmatch.keys")

ADMIN = "admin"
LEVELS = ("read", "write", "manage")
KEY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SCOPE = re.compile(r"^(admin|[a-z0-9_-]{1,64}:(read|write|manage))$")
KEY_PREFIX = "llm_"
LAST_USED_EVERY = 60.0  # seconds: last-used times reach the database at most this often per key
MAX_EXPIRES_DAYS = 36_500  # a hundred years; leave --expires out for a key that never expires


class KeyProblem(ValueError):
    """A key operation that cannot be done as asked; the message says why."""


def utcnow() -> datetime:
    """Naive UTC, the form timestamps are stored in."""
    return datetime.now(UTC).replace(tzinfo=None)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A random key: 256 bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_scopes(scopes: list[str]) -> list[str]:
    """The scopes, deduplicated in order; refuses anything but ``admin`` and ``DATASET:read|write|manage``."""
    if not scopes:
        raise KeyProblem("give at least one --scope: admin, or DATASET:read, DATASET:write, DATASET:manage")
    for scope in scopes:
        if not SCOPE.match(scope):
            raise KeyProblem(
                f"invalid scope {scope!r}: use admin or DATASET:read|write|manage (DATASET as [a-z0-9_-]{{1,64}})"
            )
    return list(dict.fromkeys(scopes))


def create_key(
    session: Session, name: str, scopes: list[str], expires_days: float | None = None, *, actor: str = "cli"
) -> str:
    """Store a new key's hash and return the key itself (the only time it is seen)."""
    if not KEY_NAME.match(name):
        raise KeyProblem(f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    scopes = check_scopes(scopes)
    check_expires_days(expires_days)
    if session.scalar(select(ApiKey.id).where(ApiKey.name == name)) is not None:
        raise KeyProblem(_name_taken(name))
    key = new_key()
    expires = utcnow() + timedelta(days=expires_days) if expires_days is not None else None
    session.add(ApiKey(name=name, key_hash=hash_key(key), scopes=scopes, expires_at=expires))
    try:
        session.flush()
    except IntegrityError:  # created at the same moment by someone else, after the check above
        raise KeyProblem(_name_taken(name)) from None
    audit.record(session, actor, "key.create", name, {"scopes": scopes, "expires_at": _iso(expires)})
    return key


def check_expires_days(expires_days: float | None) -> None:
    """Refuses an expiry that is not a number of days from just above 0 to ``MAX_EXPIRES_DAYS`` (nan, inf)."""
    if expires_days is not None and not 0 < expires_days <= MAX_EXPIRES_DAYS:
        raise KeyProblem(
            f"--expires must be a number of days above 0 and at most {MAX_EXPIRES_DAYS:,}, not {expires_days:g}; "
            "leave it out for a key that never expires"
        )


def _name_taken(name: str) -> str:
    return f"a key named {name!r} already exists (names stay taken after revocation); choose another"


def ensure_key(session: Session, name: str, key: str, scopes: list[str], *, actor: str = "startup") -> str:
    """Make sure the key ``name`` exists with this value (deployment secrets): created, rotated, or left as is.
    Returns what was done. A revoked key stays revoked."""
    if len(key) < 32:
        raise KeyProblem(f"the key for {name!r} has {len(key)} characters; use at least 32 random characters")
    found = session.scalar(select(ApiKey).where(ApiKey.name == name))
    digest = hash_key(key)
    if found is None:
        session.add(ApiKey(name=name, key_hash=digest, scopes=check_scopes(scopes)))
        session.flush()
        audit.record(session, actor, "key.create", name, {"scopes": scopes})
        return "created"
    if found.revoked_at is not None:
        return "revoked"
    if found.key_hash == digest:
        return "unchanged"
    found.key_hash = digest
    audit.record(session, actor, "key.rotate", name)
    return "rotated"


def revoke_key(session: Session, name: str, *, actor: str = "cli") -> bool:
    """Revoke the key ``name``; False when it already was. Its row stays (audit, name stays taken)."""
    found = session.scalar(select(ApiKey).where(ApiKey.name == name).with_for_update())
    if found is None:
        raise KeyProblem(f"no key named {name!r}; `llmatch keys list` shows the keys")
    if found.revoked_at is not None:
        return False
    found.revoked_at = utcnow()
    audit.record(session, actor, "key.revoke", name)
    return True


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.name)))


def key_status(key: ApiKey, now: datetime | None = None) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= (now or utcnow()):
        return "expired"
    return "active"


def any_key_exists(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).limit(1)) is not None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment else None


# ------------------------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class KeyInfo:
    name: str
    scopes: frozenset[str]
    expires_at: datetime | None
    revoked: bool


class KeyCache:
    """Every key's hash, name and scopes in memory, reloaded every ``refresh_seconds`` (and on an unknown key,
    at most once a second), so a request costs no database round trip. Auth is on once any key exists,
    revoked or not, so revoking every key locks the API rather than opening it."""

    def __init__(self, session_factory: sessionmaker[Session], refresh_seconds: float):
        self.session_factory = session_factory
        self.refresh_seconds = refresh_seconds
        self.miss_refresh_seconds = min(1.0, refresh_seconds)
        self._keys: dict[str, KeyInfo] = {}
        self._loaded_at = float("-inf")
        self._lock = threading.Lock()
        self._used: dict[str, datetime] = {}  # key name -> last use not yet written
        self._written: dict[str, float] = {}  # key name -> monotonic time of the last write

    @property
    def loaded(self) -> bool:
        return self._loaded_at > float("-inf")

    @property
    def auth_on(self) -> bool:
        return bool(self._keys)

    def stale(self) -> bool:
        return time.monotonic() - self._loaded_at >= self.refresh_seconds

    def may_refresh_on_miss(self) -> bool:
        return time.monotonic() - self._loaded_at >= self.miss_refresh_seconds

    def refresh(self, older_than: float = 0.0) -> None:
        """Reload the keys (unless another thread did in the last ``older_than`` seconds) and write the
        last-used times that are due."""
        with self._lock:
            if time.monotonic() - self._loaded_at < older_than:
                return
            self._write_last_used()
            with self.session_factory() as session:
                rows = session.execute(
                    select(ApiKey.key_hash, ApiKey.name, ApiKey.scopes, ApiKey.expires_at, ApiKey.revoked_at)
                ).all()
            self._keys = {
                digest: KeyInfo(name, frozenset(scopes or ()), expires, revoked is not None)
                for digest, name, scopes, expires, revoked in rows
            }
            self._loaded_at = time.monotonic()

    def lookup(self, key: str) -> KeyInfo | None:
        return self._keys.get(hash_key(key))

    def used(self, name: str) -> None:
        self._used[name] = utcnow()

    def _write_last_used(self) -> None:
        now = time.monotonic()
        due = {
            name: moment
            for name, moment in list(self._used.items())
            if now - self._written.get(name, float("-inf")) >= LAST_USED_EVERY
        }
        if not due:
            return
        with transaction(self.session_factory) as session:
            for name, moment in due.items():
                session.execute(update(ApiKey).where(ApiKey.name == name).values(last_used_at=moment))
        for name in due:
            self._written[name] = now
            self._used.pop(name, None)


def ensure_configured_admin_key(session_factory: sessionmaker[Session], name: str, key: str) -> str:
    """``ensure_key`` for the admin key of the settings, tolerating a concurrent start creating it too."""
    try:
        with transaction(session_factory) as session:
            return ensure_key(session, name, key, [ADMIN])
    except IntegrityError:
        return "created elsewhere"


# --------------------------------------------------------------------------------- `llmatch keys ...`


def run_keys_command(
    settings: Settings, action: str, name: str | None, scopes: list[str], expires: float | None
) -> int:
    """``llmatch keys create|list|revoke``: prints for a person; the new key alone on the last line."""
    engine = make_engine(settings.resolved_database_url)
    factory = make_session_factory(engine)
    try:
        if action == "create":
            with transaction(factory) as session:
                key = create_key(session, name or "", scopes, expires)
            until = f", expires in {expires:g} days" if expires is not None else ""
            print(f"created key {name!r} with scopes {', '.join(check_scopes(scopes))}{until}")
            print("it is shown only this once (only its hash is stored); send it as: Authorization: Bearer <key>")
            print(key)
        elif action == "revoke":
            with transaction(factory) as session:
                done = revoke_key(session, name or "")
            print(f"revoked key {name!r}" if done else f"key {name!r} was already revoked")
        else:
            with factory() as session:
                print(_key_table(list_keys(session)))
    except KeyProblem as problem:
        print(f"llmatch: {problem}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0


def _key_table(keys: list[ApiKey]) -> str:
    if not keys:
        return "no API keys: auth is off (allowed on a loopback address only); create one with `llmatch keys create`"
    now = utcnow()
    rows = [("name", "scopes", "status", "created", "expires", "last used")]
    for key in keys:
        rows.append(
            (
                key.name,
                " ".join(key.scopes),
                key_status(key, now),
                _iso(key.created_at) or "-",
                _iso(key.expires_at) or "never",
                _iso(key.last_used_at) or "never",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
