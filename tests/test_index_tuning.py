"""An inverted file's nprobe is tuned at build time toward a target recall (``tune_nprobe``): measured on a sample
of its own vectors, checked here on queries it never saw. Real FAISS over the skewed synthetic space, whose
clusters do not line up with the index's lists."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from bench.vectors import Space
from llmatch.settings import Settings
from matching.index import VectorIndex
from matching.index_policy import IndexPolicy, nlist_for

SIZE = 20_000


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    space = Space.skewed()
    vectors = space.array(SIZE, seed=1)
    return np.arange(SIZE, dtype=np.int64) * 7 + 3, vectors, space.array(300, seed=2)


def _held_out_recall(index: VectorIndex, ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray) -> float:
    _, exact = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = index.search(queries, 10)
    return float(np.mean([len(set(f) & set(ids[e])) / 10 for f, e in zip(found, exact, strict=True)]))


def test_tuning_raises_nprobe_until_recall_reaches_the_target(data):
    ids, vectors, queries = data
    fixed = VectorIndex.build(ids, ids, vectors, policy=IndexPolicy(kind="ivf", nprobe=2))
    tuned = VectorIndex.build(ids, ids, vectors, policy=IndexPolicy(kind="ivf", nprobe=2, target_recall=0.95))
    assert fixed.cpu.nprobe == 2 and tuned.cpu.nprobe > 2
    assert tuned.cpu.nprobe <= tuned.cpu.nlist // 2
    fixed_recall = _held_out_recall(fixed, ids, vectors, queries)
    tuned_recall = _held_out_recall(tuned, ids, vectors, queries)
    assert fixed_recall < 0.9 and tuned_recall >= 0.93, (fixed_recall, tuned_recall)


def test_a_dataset_that_names_its_nprobe_gets_exactly_that(data):
    ids, vectors, _ = data
    policy = IndexPolicy(kind="ivf", nprobe=32, target_recall=0.99).with_options({"nprobe": 3})
    assert policy.target_recall == 0
    assert VectorIndex.build(ids, ids, vectors, policy=policy).cpu.nprobe == 3


def test_the_tuned_nprobe_survives_the_index_files(data, tmp_path):
    ids, vectors, _ = data
    policy = IndexPolicy(kind="ivf", nprobe=2, target_recall=0.95)
    built = VectorIndex.build(ids, ids, vectors, policy=policy)
    built.save(tmp_path / "index", {})
    loaded = VectorIndex.load(tmp_path / "index", built.fingerprint(), policy=policy)
    assert loaded is not None and loaded.cpu.nprobe == built.cpu.nprobe > 2
    # without a target recall, a policy searches exactly its own nprobe
    more = VectorIndex.load(tmp_path / "index", built.fingerprint(), policy=IndexPolicy(kind="ivf", nprobe=40))
    assert more is not None and more.cpu.nprobe == 40


def test_the_list_count_follows_the_setting_and_either_count_is_tuned_to_the_target(data):
    """``LLMATCH_INDEX_LISTS_PER_SQRT`` sets an inverted file's list count; with either count the tuning raises
    nprobe until the target is met, and queries it never saw find as many neighbours."""
    ids, vectors, queries = data
    built = {}
    for per_sqrt in (1.0, 2.0):
        settings = Settings(index_kind="ivf", index_nprobe=2, index_target_recall=0.95, index_lists_per_sqrt=per_sqrt)
        built[per_sqrt] = VectorIndex.build(ids, ids, vectors, policy=IndexPolicy.from_settings(settings))
    one, two = built[1.0].cpu, built[2.0].cpu
    assert (one.nlist, two.nlist) == (nlist_for(SIZE, 1.0), nlist_for(SIZE, 2.0)) == (141, 283)
    assert one.nprobe > 2 and two.nprobe > 2
    recalls = [_held_out_recall(built[p], ids, vectors, queries) for p in (1.0, 2.0)]
    assert min(recalls) >= 0.93, recalls
