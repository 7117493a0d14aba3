"""Engine and session factory for PostgreSQL or the embedded SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


# Execution option that marks a connection's transactions as writes (see ``transaction``).
WRITE = "llmatch_write"


# Connections a process keeps open: at least the requests it serves at once (a connection opened per request
# costs a PostgreSQL backend start, or on SQLite a file open, four pragmas and a parse of the schema).
DEFAULT_POOL_SIZE = 20


def make_engine(url: str, pool_size: int = DEFAULT_POOL_SIZE) -> Engine:
    """Create an engine keeping ``pool_size`` connections open (as many more, closed after use, for bursts).
    SQLite gets WAL, a busy timeout, durable commits, and two kinds of transaction: reads begin deferred (WAL
    lets them run beside a writer, on a snapshot), writes take the write lock up front."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)

    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=pool_size, max_overflow=pool_size
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy issue BEGIN itself (below) instead of pysqlite's deferred transactions.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        # An acknowledged write survives a power cut, not only a crash of the process (WAL's NORMAL would not).
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        # A writer takes the lock up front so concurrent writers wait (busy timeout) instead of failing with
        # SQLITE_BUSY when a deferred read transaction tries to upgrade; readers never wait for the lock.
        write = connection.get_execution_options().get(WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def db_now(session: Session) -> datetime:
    """The database's clock as naive UTC (the form timestamps are stored in): leases are measured on one clock
    however many machines run workers."""
    if session.get_bind().dialect.name == "sqlite":
        stamp = session.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        return datetime.fromisoformat(stamp)
    return session.execute(text("SELECT timezone('UTC', clock_timestamp())")).scalar_one()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A write: a session whose work is committed on success and rolled back on error. Every write goes through
    here (plain ``factory()`` sessions are reads: on SQLite they cannot take the write lock)."""
    with factory() as session, session.begin():
        session.connection(execution_options={WRITE: True})
        yield session
