"""Apply and check Alembic migrations from code (``llmatch migrate`` and the start-up check)."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

log = logging.getLogger("llmatch.migrate")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade_to_head(engine: Engine) -> None:
    """Apply every pending migration on ``engine``'s database."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:
            # Rebuilding a table (SQLite's way to alter one) drops the old copy: with foreign keys on, that
            # drop would cascade to the rows referencing it. The pragma only takes effect outside a transaction.
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise RuntimeError("migration left rows whose foreign keys point nowhere; rolled back")
        finally:
            if sqlite:
                connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def is_empty(engine: Engine) -> bool:
    """True when the database holds no table at all (a store that was never set up)."""
    return not inspect(engine).get_table_names()


def pending_migrations_message(engine: Engine) -> str | None:
    """None when the schema is at head, else a sentence telling the operator what to run."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return None
    return f"database schema is at revision {current or 'none'} but the code needs {head}: run `llmatch migrate` first"


def ensure_schema(engine: Engine) -> str | None:
    """Create the schema of an embedded (SQLite) store that holds no table yet; then, like
    ``pending_migrations_message``, None when the schema is at head, else what the operator must run.
    PostgreSQL, and a SQLite file behind on migrations, are never changed here."""
    if engine.dialect.name == "sqlite" and is_empty(engine):
        upgrade_to_head(engine)
        log.info("created the schema of a new embedded store at %s", engine.url.database)
    return pending_migrations_message(engine)
