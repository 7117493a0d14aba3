"""The index at scale: structure chosen by size, memory-lean state, paged start-up, and index files that are
private while written, committed atomically, saved periodically and rebuilt (without encoding) when damaged."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CountingPool
from fastapi.testclient import TestClient
from sqlalchemy import update

from bench.vectors import Space, store_vectors
from llmatch.db import make_engine, make_session_factory
from llmatch.models import Record
from matching import index_sync
from matching.index import VectorIndex
from matching.index_files import fingerprint
from matching.index_policy import MIN_APPROXIMATE_SIZE, IndexPolicy
from matching.registry import IndexRegistry
from service.app import create_app

SPACE = Space(dim=32, latent=8, clusters=200, spread=0.3, noise=0.05)


def _exact_top(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :k]]


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def _index(n: int, policy: IndexPolicy, seed: int = 1) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    vectors = SPACE.array(n, seed)
    ids = np.arange(1, n + 1, dtype=np.int64) * 3  # record ids are not positions
    return VectorIndex.build(ids, ids + 7, vectors, policy=policy), ids, vectors


def test_structure_follows_size_and_the_approximate_index_keeps_recall():
    policy = IndexPolicy(approximate_above=6000, nprobe=16)
    small, _, _ = _index(5000, policy)
    assert small.structure == "flat"
    index, ids, vectors = _index(8000, policy)
    assert index.structure == "ivf" and index.cpu.nprobe == 16
    queries = SPACE.array(100, seed=2)
    _, found = index.search(queries, 10)
    assert _recall(found, _exact_top(vectors, ids, queries, 10)) >= 0.95
    assert IndexPolicy(kind="flat", approximate_above=10).structure(10**6) == "flat"
    assert IndexPolicy(kind="ivf").structure(MIN_APPROXIMATE_SIZE) == "ivf"
    assert IndexPolicy(kind="ivf").structure(MIN_APPROXIMATE_SIZE - 1) == "flat"


def test_growing_past_the_threshold_turns_exact_into_approximate_without_losing_anything():
    policy = IndexPolicy(approximate_above=5000, nprobe=64)
    vectors = SPACE.array(6000, seed=3)
    ids = np.arange(6000, dtype=np.int64) + 100
    index = VectorIndex(SPACE.dim, policy=policy)
    for start in range(0, 6000, 1000):
        index.upsert(ids[start : start + 1000], ids[start : start + 1000] * 2, vectors[start : start + 1000])
    assert index.structure == "ivf" and index.size == 6000
    np.testing.assert_array_equal(index.embedding_ids_of(ids), ids * 2)
    _, found = index.search(vectors[:50], 1)
    assert (found[:, 0] == ids[:50]).mean() >= 0.95  # each stored vector finds itself


@pytest.mark.parametrize("policy", [IndexPolicy(kind="flat"), IndexPolicy(kind="ivf", nprobe=256)], ids=str)
def test_updates_and_removals_change_only_what_they_name(policy):
    index, ids, vectors = _index(MIN_APPROXIMATE_SIZE + 500, policy)
    assert index.structure == policy.kind
    moved = ids[:10]
    index.upsert(moved, np.full(10, 999), -vectors[:10])  # new content for ten records
    index.remove(ids[10:20].tolist() + [123456789])  # and ten removed (one unknown id ignored)
    assert index.size == len(ids) - 10
    held = index.embedding_ids_of(ids[:30])
    assert held[:10].tolist() == [999] * 10 and held[10:20].tolist() == [-1] * 10
    np.testing.assert_array_equal(held[20:], ids[20:30] + 7)
    scores, found = index.search(-vectors[:10], 1)
    np.testing.assert_array_equal(found[:, 0], moved)
    _, found = index.search(vectors[10:20], 5)
    assert not set(found.ravel()) & set(ids[10:20].tolist())


def test_state_holds_no_python_object_per_vector():
    index, ids, _ = _index(6000, IndexPolicy(approximate_above=5000))
    index.upsert(ids[:100], ids[:100], SPACE.array(100, seed=9))
    for name, value in vars(index).items():
        if isinstance(value, dict | list | set | tuple):
            assert len(value) < 100, f"{name} grows with the number of vectors"
    assert index._record_ids.dtype == np.int64 and index._embedding_ids.dtype == np.int64


def test_fingerprint_of_arrays_equals_fingerprint_of_pairs():
    record_ids = np.array([5, 2, 9])
    embedding_ids = np.array([50, 20, 90])
    assert fingerprint(record_ids, embedding_ids) == fingerprint({2: 20, 9: 90, 5: 50}.items())
    assert fingerprint(record_ids, embedding_ids) != fingerprint(record_ids, embedding_ids + 1)


def _saved(tmp_path: Path, policy: IndexPolicy | None = None) -> tuple[VectorIndex, Path]:
    index, _, _ = _index(MIN_APPROXIMATE_SIZE + 100, policy or IndexPolicy())
    path = tmp_path / "1-a.faiss"
    index.save(path, {})
    return index, path


def _data_file(path: Path, suffix: str) -> Path:
    return path.parent / json.loads(path.with_suffix(".json").read_text())[f"{suffix}_file"]


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _garbage_same_size(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = os.urandom(64)
    file.write_bytes(bytes(data))


DAMAGE = {
    "index deleted": lambda path: _data_file(path, "index").unlink(),
    "index truncated": lambda path: _truncate(_data_file(path, "index")),
    "index garbage": lambda path: _data_file(path, "index").write_bytes(b"not a faiss index"),
    "index garbage, same size": lambda path: _garbage_same_size(_data_file(path, "index")),
    "ids garbage, same size": lambda path: _garbage_same_size(_data_file(path, "ids")),
    "manifest deleted": lambda path: path.with_suffix(".json").unlink(),
    "manifest truncated": lambda path: _truncate(path.with_suffix(".json")),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_damaged_files_are_refused(tmp_path, damage, kind):
    index, path = _saved(tmp_path, IndexPolicy(kind=kind))
    assert VectorIndex.load(path, index.fingerprint()) is not None
    DAMAGE[damage](path)
    assert VectorIndex.load(path, index.fingerprint()) is None


def test_stale_manifest_is_refused(tmp_path):
    index, path = _saved(tmp_path)
    old_manifest = path.with_suffix(".json").read_text()
    index.remove([3])
    index.save(path, {})
    path.with_suffix(".json").write_text(old_manifest)  # a manifest of an earlier save, its files gone
    assert VectorIndex.load(path, index.fingerprint()) is None
    index.save(path, {})
    assert VectorIndex.load(path, fingerprint(np.array([1]), np.array([1]))) is None  # not the database's content


def test_save_commits_by_renaming_and_leaves_only_the_committed_files(tmp_path):
    index, path = _saved(tmp_path)
    first = {_data_file(path, "index"), _data_file(path, "ids")}
    index.save(path, {})
    second = {_data_file(path, "index"), _data_file(path, "ids")}
    assert not first & second  # data files get new names: the old manifest's files stay whole until replaced
    assert all(str(os.getpid()) in file.name for file in second)
    assert set(tmp_path.iterdir()) == second | {path.with_suffix(".json")}
    assert VectorIndex.load(path, index.fingerprint()) is not None


def test_files_left_by_a_dead_process_are_removed_and_a_live_ones_kept(tmp_path):
    index, path = _saved(tmp_path)
    dead = tmp_path / "1-a.999999999-0badcafe.faiss"
    live = tmp_path / f"1-a.json.{os.getppid()}-0badcafe.tmp"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    index.save(path, {})
    assert not dead.exists() and live.exists()


def _save_repeatedly(directory: str, seed: int, rounds: int) -> None:
    index, _, _ = _index(2000, IndexPolicy(), seed=seed)
    for _ in range(rounds):
        index.save(Path(directory) / "1-a.faiss", {})


def test_concurrent_saves_from_two_processes_never_break_the_files(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_save_repeatedly, args=(str(tmp_path), seed, 15)) for seed in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    expected = _index(2000, IndexPolicy(), seed=1)[0].fingerprint()  # both hold the same ids
    loaded = VectorIndex.load(tmp_path / "1-a.faiss", expected)
    assert loaded is not None and loaded.size == 2000  # the last committed save, whole
    assert len(list(tmp_path.glob("*.faiss"))) == 1


def test_save_changed_writes_only_what_changed(tmp_path):
    registry = IndexRegistry(tmp_path)
    vectors = SPACE.array(20, seed=4)
    registry.upsert((1, "a"), np.arange(10), np.arange(10), vectors[:10])
    registry.upsert((1, "b"), np.arange(10, 20), np.arange(10, 20), vectors[10:])
    assert sorted(registry.save_changed()) == [(1, "a"), (1, "b")]
    assert registry.save_changed() == []
    registry.remove((1, "b"), [12])
    assert registry.save_changed(min_interval=3600) == []  # saved too recently
    assert registry.save_changed() == [(1, "b")]
    assert registry.embedding_ids((1, "b"), np.array([11, 12])).tolist() == [11, -1]


class NoEncoding(CountingPool):
    def encode(self, name, inputs):
        raise AssertionError(f"encoder called for {len(inputs)} inputs")


def _stored_synthetic(settings, n: int) -> None:
    engine = make_engine(settings.resolved_database_url)
    store_vectors(engine, "synthetic", "a", SPACE.sample(n, seed=5, chunk=1000))
    store_vectors(engine, "synthetic", "b", SPACE.sample(200, seed=6))
    engine.dispose()


def _answers(api: TestClient) -> list[list[str]]:
    return [
        [
            c["id"]
            for c in api.get("/candidates", params=dict(dataset="synthetic", source="b", id=f"b-{i}", k=5)).json()[
                "candidates"
            ]
        ]
        for i in range(20)
    ]


def test_start_up_pages_through_stored_vectors(settings, pool, monkeypatch):
    _stored_synthetic(settings, 2500)
    monkeypatch.setattr(index_sync, "PAGE", 300)  # many pages
    settings = settings.model_copy(update={"index_kind": "flat"})
    with TestClient(create_app(settings, pool=NoEncoding(pool), run_worker=False), base_url="http://localhost") as api:
        state = api.app.state.service
        assert len(state.synchronizer.rebuilt) == 2
        index = state.registry.get(state.synchronizer.rebuilt[0])
        assert {index.size, state.registry.get(state.synchronizer.rebuilt[1]).size} == {2500, 200}
        before = _answers(api)
        assert all(len(ids) == 5 for ids in before)
    with TestClient(create_app(settings, pool=NoEncoding(pool), run_worker=False), base_url="http://localhost") as api:
        assert len(api.app.state.service.synchronizer.loaded_from_file) == 2
        assert _answers(api) == before


@pytest.mark.parametrize("damage", ["index truncated", "index garbage, same size", "manifest truncated"])
def test_damaged_files_are_rebuilt_with_the_same_answers_and_no_encoding(settings, pool, damage):
    _stored_synthetic(settings, MIN_APPROXIMATE_SIZE + 100)
    settings = settings.model_copy(update={"index_kind": "ivf", "index_nprobe": 256})
    with TestClient(create_app(settings, pool=NoEncoding(pool), run_worker=False), base_url="http://localhost") as api:
        before = _answers(api)
    for manifest in settings.index_dir.glob("*.json"):
        DAMAGE[damage](manifest.with_suffix(".faiss"))
    with TestClient(create_app(settings, pool=NoEncoding(pool), run_worker=False), base_url="http://localhost") as api:
        sync = api.app.state.service.synchronizer
        assert len(sync.rebuilt) == 2 and sync.loaded_from_file == []
        assert api.app.state.service.registry.get(sync.rebuilt[0]).structure in {"ivf", "flat"}
        assert _answers(api) == before


def test_indexes_are_saved_periodically_not_only_at_shutdown(settings, pool):
    _stored_synthetic(settings, 300)
    settings = settings.model_copy(update={"index_save_seconds": 0.2})
    with TestClient(create_app(settings, pool=NoEncoding(pool), run_worker=False), base_url="http://localhost") as api:
        state = api.app.state.service
        manifests = sorted(settings.index_dir.glob("*.json"))
        written = {m: m.stat().st_mtime_ns for m in manifests}
        with make_session_factory(state.engine)() as session, session.begin():
            session.execute(update(Record).where(Record.external_id == "a-0").values(status="pending"))
        key = next(k for k in state.registry.keys() if k[1] == "a")
        state.registry.remove(key, [state.registry.get(key)._record_ids[0]])
        deadline = time.monotonic() + 10
        changed = settings.index_dir / f"{key[0]}-a.json"
        while changed.stat().st_mtime_ns == written[changed]:
            assert time.monotonic() < deadline, "the changed index was not saved while the service ran"
            time.sleep(0.05)
        assert json.loads(changed.read_text())["size"] == 299


def test_a_dataset_can_override_the_structure_policy(tmp_path):
    registry = IndexRegistry(tmp_path, policy=IndexPolicy(kind="ivf"))
    registry.dataset_policies[1] = IndexPolicy(kind="flat")
    vectors = SPACE.array(MIN_APPROXIMATE_SIZE, seed=8)
    ids = np.arange(len(vectors))
    for dataset_id in (1, 2):
        registry.upsert((dataset_id, "a"), ids, ids, vectors)
    assert registry.get((1, "a")).structure == "flat"
    assert registry.get((2, "a")).structure == "ivf"
