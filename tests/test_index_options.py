"""A dataset's own FAISS index policy (``PUT /datasets/{name}`` with ``index``): stored, shown as the policy in
force, applied to its indexes at start-up, at once in the process that took the change and at the next poll in
the others, and checked against index files saved under another policy."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from conftest import CountingPool, migrate_engine
from fastapi.testclient import TestClient
from sqlalchemy import inspect, select, text, update

from bench.vectors import Space, store_vectors
from llmatch.db import make_engine
from llmatch.models import Dataset, IndexChange
from llmatch.settings import Settings
from matching.index import VectorIndex
from matching.index_policy import MIN_APPROXIMATE_SIZE, storage_of
from service.app import create_app

SPACE = Space(dim=32, latent=8, clusters=200, spread=0.3, noise=0.05)
BIG = MIN_APPROXIMATE_SIZE + 100  # enough vectors for an inverted file
IVF = {"kind": "ivf", "approximate_above": 1, "nprobe": 256}  # 256 >= its lists: an exhaustive, exact search


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Server settings other than the defaults, so that the merge of a dataset's options over them shows."""
    return settings.model_copy(update={"index_approximate_above": 20_000, "index_nprobe": 48})


def _server_policy(settings: Settings) -> dict:
    return {
        "kind": settings.index_kind,
        "approximate_above": settings.index_approximate_above,
        "nprobe": settings.index_nprobe,
        "storage": settings.index_storage,
    }


def _stored_options(client: TestClient, name: str) -> dict | None:
    with client.app.state.service.session_factory() as session:
        return session.scalar(select(Dataset.index_options).where(Dataset.name == name))


# ------------------------------------------------------------------------------------------ the API


def test_index_options_are_stored_and_shown_as_the_policy_in_force(client, settings):
    response = client.put("/datasets/shop", json={"index": {"kind": "ivf", "nprobe": 8}})
    assert response.status_code == 201, response.text
    effective = {**_server_policy(settings), "kind": "ivf", "nprobe": 8}
    assert response.json()["index"] == effective
    assert client.get("/datasets/shop").json()["index"] == effective
    assert _stored_options(client, "shop") == {"kind": "ivf", "nprobe": 8}  # only what was sent
    assert client.put("/datasets/other", json={}).json()["index"] == _server_policy(settings)
    listed = {d["name"]: d["index"] for d in client.get("/datasets").json()["datasets"]}
    assert listed == {"shop": effective, "other": _server_policy(settings)}
    # The index object replaces the whole override: fields left out follow the server again.
    response = client.put("/datasets/shop", json={"index": {"storage": "float16"}})
    assert response.json()["index"] == {**_server_policy(settings), "storage": "float16"}
    # A body without index leaves the override as it is.
    assert client.put("/datasets/shop", json={"serialization": "plain"}).json()["index"]["storage"] == "float16"


@pytest.mark.parametrize(
    "index",
    [
        {"kind": "hnsw"},
        {"approximate_above": 0},
        {"nprobe": 0},
        {"nprobe": 65537},
        {"nprobe": "many"},
        {"storage": "int8"},
        {"nlist": 64},
        "ivf",
        [],
    ],
    ids=str,
)
def test_invalid_index_options_are_a_422_and_change_nothing(client, index):
    assert client.put("/datasets/shop", json={"index": {"kind": "flat"}}).status_code == 201
    response = client.put("/datasets/shop", json={"index": index})
    assert response.status_code == 422, response.text
    assert _stored_options(client, "shop") == {"kind": "flat"}


def test_index_null_clears_the_override(client, settings):
    client.put("/datasets/shop", json={"index": {"kind": "flat", "approximate_above": 7, "storage": "float16"}})
    response = client.put("/datasets/shop", json={"index": None})
    assert response.status_code == 200
    assert response.json()["index"] == _server_policy(settings)
    assert _stored_options(client, "shop") is None
    client.put("/datasets/shop", json={"index": {"kind": "flat"}})
    assert client.put("/datasets/shop", json={"index": {}}).json()["index"] == _server_policy(settings)
    assert _stored_options(client, "shop") is None


def test_changing_only_the_index_options_requeues_nothing(products, client, counting_pool, drain):
    factory = client.app.state.service.session_factory
    with factory() as session:
        log_before = session.scalar(select(IndexChange.id).order_by(IndexChange.id.desc()).limit(1))
    counting_pool.calls.clear()
    for index in ({"kind": "flat", "storage": "float16"}, {"kind": "ivf", "nprobe": 4}, None):
        response = client.put(f"/datasets/{products}", json={"index": index})
        assert response.status_code == 200, response.text
        assert response.json()["totals"] == {"pending": 0, "encoded": 9, "failed": 0, "total": 9}
    drain()
    assert counting_pool.calls == []  # nothing was encoded again
    with factory() as session:
        assert session.scalar(select(IndexChange.id).order_by(IndexChange.id.desc()).limit(1)) == log_before
    candidates = client.get("/candidates", params=dict(dataset=products, source="a", id="a3", k=3)).json()
    assert candidates["candidates"][0]["id"] == "b3"


# ------------------------------------------------------------------------------------------ the indexes


class NoEncoding(CountingPool):
    def encode(self, name, inputs):
        raise AssertionError(f"encoder called for {len(inputs)} inputs")


def _store(settings: Settings, dataset: str, encoder_key: str) -> None:
    """``BIG`` synthetic vectors in source a, 50 in source b, stored as encoded records under the dataset's encoder
    key (no encoder involved; the service takes them for its encoder's)."""
    engine = make_engine(settings.resolved_database_url)
    store_vectors(engine, dataset, "a", SPACE.sample(BIG, seed=5, chunk=1000), encoder_key)
    store_vectors(engine, dataset, "b", SPACE.sample(50, seed=6), encoder_key)
    engine.dispose()


def _index(api: TestClient, dataset: str, source: str = "a") -> VectorIndex:
    state = api.app.state.service
    with state.session_factory() as session:
        dataset_id = session.scalar(select(Dataset.id).where(Dataset.name == dataset))
    index = state.registry.get((dataset_id, source))
    assert index is not None
    return index


def _answers(api: TestClient, dataset: str) -> list[list[str]]:
    """The 5 candidates in source a of each record of source b (a search of the index of source a)."""
    answers = []
    for i in range(50):
        params = dict(dataset=dataset, source="b", id=f"b-{i}", k=5, target_source="a")
        response = api.get("/candidates", params=params)
        assert response.status_code == 200, response.text
        answers.append([c["id"] for c in response.json()["candidates"]])
    return answers


def _service(settings: Settings, pool) -> TestClient:
    return TestClient(create_app(settings, pool=NoEncoding(pool), run_worker=False), base_url="http://localhost")


def _two_stored_datasets(settings: Settings, pool) -> None:
    """Two datasets of ``BIG`` + 50 stored vectors each: 'big' with IVF options, 'other' without."""
    with _service(settings, pool) as api:
        assert api.put("/datasets/big", json={"index": IVF}).status_code == 201
        assert api.put("/datasets/other", json={}).status_code == 201
    key = pool.spec("minilm").key
    _store(settings, "big", key)
    _store(settings, "other", key)


@pytest.fixture
def two_datasets(settings: Settings, pool) -> Iterator[TestClient]:
    """A service started over ``_two_stored_datasets``: their indexes built at start-up."""
    _two_stored_datasets(settings, pool)
    with _service(settings, pool) as api:
        yield api


def test_a_dataset_with_ivf_options_gets_an_ivf_index_while_another_stays_flat(two_datasets):
    api = two_datasets
    big, other = _index(api, "big"), _index(api, "other")
    assert (big.structure, big.size, big.cpu.nprobe) == ("ivf", BIG, 256)
    assert (other.structure, other.size) == ("flat", BIG)  # the server's auto policy: exact below 20000
    assert _index(api, "big", "b").structure == "flat"  # too small for an inverted file whatever the policy
    assert _answers(api, "big") == _answers(api, "other")  # same vectors, exhaustive search: same answers


def test_switching_a_loaded_datasets_policy_changes_its_live_index(two_datasets):
    api = two_datasets
    before = _answers(api, "big")
    assert api.put("/datasets/big", json={"index": {"kind": "flat"}}).status_code == 200
    assert _index(api, "big").structure == "flat"
    assert _answers(api, "big") == before
    assert api.put("/datasets/big", json={"index": {**IVF, "storage": "float16"}}).status_code == 200
    index = _index(api, "big")
    assert (index.structure, storage_of(index.cpu), index.cpu.nprobe) == ("ivf", "float16", 256)
    half = _answers(api, "big")
    assert [a[0] for a in half] == [a[0] for a in before]  # half precision: the same nearest records
    assert np.mean([len(set(h) & set(b)) / 5 for h, b in zip(half, before, strict=True)]) >= 0.9
    assert api.put("/datasets/big", json={"index": {**IVF, "nprobe": 2}}).status_code == 200
    index = _index(api, "big")
    assert (index.structure, storage_of(index.cpu), index.cpu.nprobe) == ("ivf", "float32", 2)
    assert _index(api, "other").structure == "flat"  # the other dataset keeps the server's policy


def test_another_process_follows_a_change_at_its_next_poll(two_datasets, settings, pool):
    elsewhere = settings.model_copy(update={"data_dir": settings.data_dir.parent / "elsewhere"})
    with TestClient(
        create_app(elsewhere, pool=NoEncoding(pool), run_worker=False), base_url="http://localhost"
    ) as other_process:
        assert _index(other_process, "big").structure == "ivf"
        assert two_datasets.put("/datasets/big", json={"index": None}).status_code == 200
        assert _index(two_datasets, "big").structure == "flat"  # at once where the change was made
        other_process.app.state.service.synchronizer.poll()
        assert _index(other_process, "big").structure == "flat"
        assert two_datasets.put("/datasets/other", json={"index": IVF}).status_code == 200
        other_process.app.state.service.synchronizer.poll()
        assert _index(other_process, "other").structure == "ivf"
        assert _answers(other_process, "other") == _answers(two_datasets, "other")


def test_index_files_saved_under_another_policy_are_not_served_as_they_are(settings, pool):
    _two_stored_datasets(settings, pool)
    with _service(settings, pool) as api:
        assert api.put("/datasets/big", json={"index": {**IVF, "storage": "float16"}}).status_code == 200
        before = _answers(api, "other")
    # Saved at shutdown: big as float16 (ivf, and flat for source b), other as flat. Then, while the service
    # is down, another process changes both policies.
    engine = make_engine(settings.resolved_database_url)
    with engine.begin() as connection:
        connection.execute(update(Dataset).where(Dataset.name == "big").values(index_options=IVF))
        connection.execute(update(Dataset).where(Dataset.name == "other").values(index_options=IVF))
    engine.dispose()
    with _service(settings, pool) as api:
        big, small, other = _index(api, "big"), _index(api, "big", "b"), _index(api, "other")
        assert (big.structure, storage_of(big.cpu)) == ("ivf", "float32")
        assert (small.structure, storage_of(small.cpu)) == ("flat", "float32")
        assert (other.structure, storage_of(other.cpu)) == ("ivf", "float32")
        assert _answers(api, "other") == before
    with _service(settings, pool) as api:
        assert len(api.app.state.service.synchronizer.loaded_from_file) == 4  # saved anew under the new policy
        assert storage_of(_index(api, "big").cpu) == "float32" and _index(api, "other").structure == "ivf"


# ------------------------------------------------------------------------------------------ the migration




def test_the_migration_adds_a_nullable_json_column_on_both_databases(empty_database):
    engine = make_engine(empty_database)
    try:
        migrate_engine(engine, "0004")
        with engine.begin() as connection:
            columns = "name, encoder, serialization, seen_attributes"
            connection.execute(text(f"INSERT INTO datasets ({columns}) VALUES ('old', 'minilm', 'tagged', '[]')"))
        migrate_engine(engine, "0005")
        assert "index_options" in {c["name"] for c in inspect(engine).get_columns("datasets")}
        with engine.begin() as connection:
            assert connection.execute(select(Dataset.name, Dataset.index_options)).all() == [("old", None)]
            connection.execute(update(Dataset).values(index_options={"kind": "flat", "nprobe": 3}))
            assert connection.execute(select(Dataset.index_options)).scalar() == {"kind": "flat", "nprobe": 3}
            if engine.dialect.name == "sqlite":  # ids never reused (0002): the table keeps its AUTOINCREMENT
                sql = connection.execute(text("SELECT sql FROM sqlite_master WHERE name = 'datasets'")).scalar()
                assert "AUTOINCREMENT" in sql
        migrate_engine(engine, "0004", down=True)
        assert "index_options" not in {c["name"] for c in inspect(engine).get_columns("datasets")}
        with engine.begin() as connection:
            assert connection.execute(text("SELECT name FROM datasets")).scalars().all() == ["old"]
            if engine.dialect.name == "sqlite":
                sql = connection.execute(text("SELECT sql FROM sqlite_master WHERE name = 'datasets'")).scalar()
                assert "AUTOINCREMENT" in sql
        migrate_engine(engine, "head")
    finally:
        engine.dispose()
