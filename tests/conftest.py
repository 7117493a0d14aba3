"""Shared fixtures: a fresh database per test on SQLite and on the local PostgreSQL, the real MiniLM
encoder (loaded once), and API clients over them."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import psycopg
import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import Engine, make_url

from encoder_worker.worker import EncoderWorker
from encoding.encoder import EncoderInput
from encoding.registry import EncoderPool
from llmatch.db import make_engine, make_session_factory
from llmatch.migrate import alembic_config, upgrade_to_head
from llmatch.settings import Settings
from service.app import create_app

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PG_ADMIN_URL = os.environ.get("LLMATCH_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ("sqlite", "pg")


def _pg_admin() -> psycopg.Connection:
    return psycopg.connect(PG_ADMIN_URL, autocommit=True)


@contextlib.contextmanager
def empty_pg_database(prefix: str) -> Iterator[str]:
    """The URL of a new PostgreSQL database without tables, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield str(make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name))
    finally:
        with _pg_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=("sqlite", "pg"))
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database without tables (SQLite file, or a new PostgreSQL database dropped afterwards): for migrations."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrate.sqlite3'}"
        return
    with empty_pg_database("llmatch_migrate") as url:
        yield url


def migrate_engine(engine: Engine, revision: str, down: bool = False) -> None:
    """Upgrade (or, with ``down``, downgrade) the database behind ``engine`` to an Alembic ``revision``."""
    with engine.begin() as connection:
        config = alembic_config(engine.url.render_as_string(hide_password=False))
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL database that each test copies (CREATE DATABASE ... TEMPLATE)."""
    name = f"llmatch_tmpl_{uuid.uuid4().hex[:10]}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = str(make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name))
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    yield name
    with _pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test."""
    name = f"llmatch_test_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield str(make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name))
    with _pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'llmatch.sqlite3'}"
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    return url


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs twice: on SQLite and on PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=tmp_path / "data",
        worker_batch_size=16,
        worker_poll_seconds=0.05,
        index_sync_seconds=0.1,
        device="cpu",
    )


@pytest.fixture(scope="session")
def pool(tmp_path_factory: pytest.TempPathFactory) -> EncoderPool:
    """The real encoders (MiniLM is the embedded default), loaded once for the whole run."""
    data_dir = tmp_path_factory.mktemp("pool")
    return EncoderPool(Settings(data_dir=data_dir, device="cpu"))


class CountingPool(EncoderPool):
    """The real pool, recording every input it encodes (to show what was, or was not, encoded)."""

    def __init__(self, inner: EncoderPool):
        self.__dict__.update(inner.__dict__)  # shares the loaded models
        self.specs, self._locks = dict(inner.specs), dict(inner._locks)
        self.calls: list[EncoderInput] = []

    def encode(self, name: str, inputs: Sequence[EncoderInput]) -> np.ndarray:
        self.calls.extend(inputs)
        return super().encode(name, inputs)


@pytest.fixture
def counting_pool(pool: EncoderPool) -> CountingPool:
    return CountingPool(pool)


@pytest.fixture
def client(settings: Settings, counting_pool: CountingPool) -> Iterator[TestClient]:
    """The API without an in-process worker: tests run the worker explicitly with ``drain``."""
    with TestClient(
        create_app(settings, pool=counting_pool, run_worker=False), base_url="http://localhost"
    ) as test_client:
        yield test_client


@pytest.fixture
def drain(client: TestClient, settings: Settings, counting_pool: CountingPool):
    """Encode everything pending, then wait until the API's indexes have caught up."""

    def run() -> None:
        state = client.app.state.service
        EncoderWorker(state.session_factory, counting_pool, settings).drain()
        state.synchronizer.poll()

    return run


def make_worker(settings: Settings, pool: EncoderPool) -> EncoderWorker:
    return EncoderWorker(make_session_factory(make_engine(settings.resolved_database_url)), pool, settings)


PRODUCTS_A = [
    ("a1", {"name": "sony bravia 55 inch 4k tv kd55x85j", "price": 899.0}),
    ("a2", {"name": "canon eos r6 mirrorless camera body", "price": 2499.0}),
    ("a3", {"name": "apple airpods pro 2nd generation", "price": None}),
    ("a4", {"name": "bose quietcomfort 45 headphones black", "price": 329.0}),
]
PRODUCTS_B = [
    ("b1", {"name": 'Sony KD55X85J Bravia 55" 4K Ultra HD Smart TV', "price": "899.99"}),
    ("b2", {"name": "Canon EOS R6 Full-Frame Mirrorless Camera (Body Only)", "price": "2,499"}),
    ("b3", {"name": "AirPods Pro (2nd gen) by Apple", "price": None}),
    ("b4", {"name": "Bose QC45 wireless noise cancelling headphones", "price": "329"}),
    ("b5", {"name": "Logitech MX Master 3S mouse", "price": "99"}),
]


def records_body(dataset: str, source: str, rows) -> dict:
    return {"dataset": dataset, "source": source, "records": [{"id": i, "attributes": a} for i, a in rows]}


@pytest.fixture
def products(client: TestClient, drain) -> str:
    """A dataset 'shop' with sources a and b, all encoded and indexed."""
    assert client.put("/datasets/shop", json={}).status_code == 201
    assert client.post("/records", json=records_body("shop", "a", PRODUCTS_A)).status_code == 202
    assert client.post("/records", json=records_body("shop", "b", PRODUCTS_B)).status_code == 202
    drain()
    return "shop"
