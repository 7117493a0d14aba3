"""The default order of GET /review ("teaching"): nearest the threshold first, spread over records, and one slot
in five exploring away from the threshold, the same page for the same labelled state. On SQLite and PostgreSQL,
through the real app and real FAISS indexes; the exploring dataset's vectors are made here and stored directly."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from conftest import CountingPool
from fastapi.testclient import TestClient

from bench.vectors import store_vectors
from llmatch.db import make_engine
from llmatch.settings import Settings
from matching.review import choose, exploring_slots
from service.app import create_app

DIM = 384
LEFTS, RIGHTS, MATCHES = 30, 30, 4  # a-i matches b-i for i < MATCHES; every other pair is a non-match


def review(client: TestClient, dataset: str, **params) -> dict:
    response = client.get(f"/datasets/{dataset}/review", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def key(pair: dict) -> tuple[str, str, str, str]:
    return (pair["left"]["source"], pair["left"]["id"], pair["right"]["source"], pair["right"]["id"])


def records(pair: dict) -> set[tuple[str, str]]:
    return {(pair["left"]["source"], pair["left"]["id"]), (pair["right"]["source"], pair["right"]["id"])}


def label(left: str, right: str, value: int) -> dict:
    return {"left_source": "a", "left_id": left, "right_source": "b", "right_id": right, "label": value}


# ------------------------------------------------------------------------------------ the engine alone


def test_exploring_slots_are_one_in_five_and_at_least_one_from_three_pairs():
    assert [exploring_slots(n) for n in (0, 1, 2)] == [set(), set(), set()]
    assert exploring_slots(3) == {2} and exploring_slots(4) == {3} and exploring_slots(7) == {4}
    assert exploring_slots(20) == {4, 9, 14, 19}
    assert len(exploring_slots(5000)) == 1000


def test_the_engine_explores_the_top_score_and_a_seeded_draw():
    rng = np.random.default_rng(1)
    pairs = {(i, 100 + j): float(rng.uniform(0.2, 0.8)) for i in range(40) for j in range(40)}
    pairs[(40, 140)] = 0.99  # records in no other pair: fresh whatever the page took before
    page = choose(pairs, threshold=0.5, limit=10, seed=3)
    plain = choose(pairs, threshold=0.5, limit=10, strategy="uncertainty")
    assert page[0] == plain[0] and page[4] == (40, 140), "nearest first; the fifth slot takes the highest score"
    assert all(abs(pairs[ids] - 0.5) < 0.01 for i, ids in enumerate(page) if i not in (4, 9))
    assert choose(pairs, 0.5, 10, seed=3) == page
    draws = {choose(pairs, 0.5, 10, seed=seed)[9] for seed in range(6)}
    assert len(draws) > 1 and all(abs(pairs[ids] - 0.5) > 0.01 for ids in draws), "a draw away from the threshold"


def test_the_engine_reuses_a_record_only_once_no_fresh_pair_is_left():
    pairs = {(i, j): 0.5 + 0.01 * (i - j) for i in range(3) for j in range(10, 13)}
    page = choose(pairs, threshold=0.5, limit=9)
    assert len(set(page)) == 9
    first = page[:3]
    assert len({r for ids in first for r in ids}) == 6, "three pairs over six records before any repeats"


# ------------------------------------------------------------------------------- the products dataset


def test_a_default_page_spreads_over_records_while_unused_ones_remain(products, client):
    everything = [key(p) for p in review(client, "shop", limit=100)["pairs"]]
    by_key = {key(p): records(p) for p in review(client, "shop", limit=100)["pairs"]}
    for limit in (3, 4, 6, 10):
        page = review(client, "shop", limit=limit)["pairs"]
        assert len(page) == limit
        used: set[tuple[str, str]] = set()
        for pair in page:
            if records(pair) & used:
                fresh = [k for k in everything if not by_key[k] & used]
                assert not fresh, f"limit {limit}: {key(pair)} repeats a record while {fresh[0]} was fresh"
            used |= records(pair)
    plain = review(client, "shop", limit=4, strategy="uncertainty")["pairs"]
    plain_records = [r for p in plain for r in records(p)]
    assert len(set(plain_records)) < len(plain_records), "plain nearness would ask about one record twice"


def test_the_same_labelled_state_gives_the_same_page(products, client):
    first = review(client, "shop", limit=10)
    assert review(client, "shop", limit=10) == first
    asked = first["pairs"][0]
    stored = {
        "left_source": asked["left"]["source"],
        "left_id": asked["left"]["id"],
        "right_source": asked["right"]["source"],
        "right_id": asked["right"]["id"],
        "label": 0,
    }
    assert client.put("/datasets/shop/labels", json={"pairs": [stored]}).status_code == 200
    after = review(client, "shop", limit=10)
    assert review(client, "shop", limit=10) == after
    assert key(asked) not in {key(p) for p in after["pairs"]}


# ------------------------------------------------------- matches at high scores, a threshold far below


class NoEncoding(CountingPool):
    def encode(self, name, inputs):
        raise AssertionError(f"encoder called for {len(inputs)} inputs")


def _vectors() -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors whose scores are about ``w_r * w_s`` (a shared direction weighted by ``w`` per record, the rest
    random), so non-matches score from about 0.1 to 0.7; ``b-i`` is ``a-i`` slightly moved for ``i < MATCHES``."""
    rng = np.random.default_rng(11)
    shared = rng.standard_normal(DIM)
    shared /= np.linalg.norm(shared)

    def make(weights: np.ndarray) -> np.ndarray:
        noise = rng.standard_normal((len(weights), DIM))
        noise -= np.outer(noise @ shared, shared)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        return weights[:, None] * shared + np.sqrt(1 - weights**2)[:, None] * noise

    lefts = make(np.linspace(0.3, 0.85, LEFTS))
    rights = make(np.linspace(0.3, 0.85, RIGHTS)[::-1].copy())
    moved = lefts[:MATCHES] + 0.1 * rng.standard_normal((MATCHES, DIM)) / np.sqrt(DIM)
    rights[:MATCHES] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
    return lefts.astype(np.float32), rights.astype(np.float32)


def _service(settings: Settings, pool) -> TestClient:
    return TestClient(create_app(settings, pool=NoEncoding(pool), run_worker=False), base_url="http://localhost")


@pytest.fixture
def far_off(settings: Settings, pool) -> Iterator[TestClient]:
    """Dataset 'far' (records a-0.. and b-0..) served from start-up, with three stored labels, all non-matches on
    low-scoring pairs: the review threshold sits halfway between them and the top, among the non-matches."""
    with _service(settings, pool) as api:
        assert api.put("/datasets/far", json={}).status_code == 201
    lefts, rights = _vectors()
    engine = make_engine(settings.resolved_database_url)
    store_vectors(engine, "far", "a", iter([lefts]), pool.spec("minilm").key)
    store_vectors(engine, "far", "b", iter([rights]), pool.spec("minilm").key)
    engine.dispose()
    with _service(settings, pool) as api:
        lows = [label("a-0", f"b-{RIGHTS - 1 - i}", 0) for i in range(3)]  # weights 0.3 by 0.3: scores about 0.1
        assert api.put("/datasets/far/labels", json={"pairs": lows}).status_code == 200
        yield api


def _is_match(pair: dict) -> bool:
    left, right = sorted([pair["left"]["id"], pair["right"]["id"]])
    return left.startswith("a-") and right == f"b-{left[2:]}" and int(left[2:]) < MATCHES


def test_a_default_page_finds_the_first_matches_while_the_threshold_is_far_off(far_off):
    everything = review(far_off, "far", limit=5000, strategy="uncertainty")
    assert everything["basis"] == "labels"
    scores = sorted((p["score"] for p in everything["pairs"]), reverse=True)
    matches = [p for p in everything["pairs"] if _is_match(p)]
    assert len(matches) == MATCHES and min(p["score"] for p in matches) > 0.95 > scores[MATCHES]
    assert everything["threshold"] < 0.7, "the threshold lies among the non-matches"

    plain = review(far_off, "far", limit=10, strategy="uncertainty")["pairs"]
    assert not any(_is_match(p) for p in plain), "plain nearness asks about non-matches only"
    page = review(far_off, "far", limit=10)
    assert page["threshold"] == everything["threshold"] and page["pairs"][0] == plain[0]
    assert _is_match(page["pairs"][4]) and page["pairs"][4]["score"] == scores[0], "the top score, explored"
    assert [p["score"] for p in page["pairs"][:4]] == sorted(
        (p["score"] for p in page["pairs"][:4]), key=lambda s: abs(s - page["threshold"])
    )
    assert review(far_off, "far", limit=10) == page, "the same labelled state, the same page"

    longer = review(far_off, "far", limit=20)["pairs"]
    assert sum(_is_match(p) for p in longer) >= 2, "every other exploring slot takes the next highest score"
    assert review(far_off, "far", limit=20)["pairs"] == longer
