"""The harder synthetic space of the recall benchmark, and a tiny run of ``bench/recall.py``."""

from __future__ import annotations

import json

import numpy as np

from bench import recall
from bench.scale import SPACES, exact_top, recall_at
from bench.vectors import Space
from matching.index import VectorIndex
from matching.index_policy import IndexPolicy, nlist_for


def test_the_skewed_space_is_deterministic_for_a_seed_and_gives_unit_vectors():
    space = SPACES["skewed"]
    first = space.array(3000, seed=4)
    np.testing.assert_array_equal(first, space.array(3000, seed=4))
    assert not np.array_equal(first, space.array(3000, seed=5))
    assert first.shape == (3000, space.dim) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert space == Space.skewed()


def test_the_skewed_space_has_power_law_clusters_far_more_than_lists_and_near_duplicates():
    space = SPACES["skewed"]
    weights = space.weights()
    assert space.clusters > 10 * nlist_for(1_000_000, IndexPolicy().lists_per_sqrt)
    assert weights[0] > 1000 * weights[-1] and weights[:100].sum() > 0.4  # a few clusters hold much of the data
    vectors = space.array(5000, seed=1)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -1.0)
    near_copies = (similarity.max(axis=1) > 0.95).mean()
    assert 0.2 < near_copies < 0.5  # each near-copy and its source
    clustered = SPACES["clustered"].array(5000, seed=1)
    similarity = clustered @ clustered.T
    np.fill_diagonal(similarity, -1.0)
    assert (similarity.max(axis=1) > 0.95).mean() < 0.01


def _ivf_recall(space: Space, n: int = 10_000, nprobe: int = 8) -> float:
    vectors = space.array(n + 200, seed=1)
    base, queries = vectors[200:], vectors[:200]
    ids = np.arange(n, dtype=np.int64)
    index = VectorIndex.build(ids, ids, base, policy=IndexPolicy(kind="ivf", nprobe=nprobe))
    return recall_at(index.search(queries, 10)[1], exact_top(base, queries, 10))


def test_the_service_inverted_file_finds_fewer_true_neighbours_in_the_skewed_space_than_in_the_clustered_one():
    assert _ivf_recall(SPACES["skewed"]) < _ivf_recall(SPACES["clustered"]) - 0.05


def test_a_tiny_recall_run_prints_and_writes_every_structure(tmp_path, monkeypatch):
    monkeypatch.setitem(SPACES, "tiny", Space(dim=16, latent=4, clusters=50, size_power=1.0, duplicates=0.2))
    out = tmp_path / "recall.json"
    argv = ["--sets", "tiny:5000", "--queries", "50", "--nprobe", "8", "64", "--ef-search", "16", "--out", str(out),
            "--lists-per-sqrt", "1", "2", "--storage", "float32", "float16"]  # fmt: skip
    assert recall.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    # sqrt(5000) lists, then twice as many (128: at most one list per 39 training vectors), each in both storages
    assert [r["structure"] for r in rows] == [
        "exact (IndexFlatIP)",
        "IVF71,Flat nprobe=8", "IVF71,Flat nprobe=64", "IVF71,SQfp16 nprobe=8", "IVF71,SQfp16 nprobe=64",
        "IVF128,Flat nprobe=8", "IVF128,Flat nprobe=64", "IVF128,SQfp16 nprobe=8", "IVF128,SQfp16 nprobe=64",
        "HNSW32 efSearch=16",
    ]  # fmt: skip
    assert [r["lists_per_sqrt"] for r in rows[1:9]] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert rows[0]["recall_at_10"] == 1.0 and rows[2]["recall_at_10"] > 0.95
    assert all(r["vectors"] == 5000 and r["p50_ms"] > 0 for r in rows)
