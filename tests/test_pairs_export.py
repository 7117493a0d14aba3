"""GET /datasets/{name}/pairs (contract v1.2) and `llmatch pairs`: every candidate pair once, equal to the union of
the /candidates answers at the same k, resumable by its cursor, bounded per response."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import records_body

from llmatch import cli
from llmatch import client as api_client
from matching.index import VectorIndex
from tests.test_batch import calibrate

IDS = {"a": ["a1", "a2", "a3", "a4"], "b": ["b1", "b2", "b3", "b4", "b5"]}


def lines(response) -> tuple[list[dict], str | None]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in response.text.splitlines()]
    assert list(rows[-1]) == ["cursor"]
    return rows[:-1], rows[-1]["cursor"]


def key(pair: dict) -> frozenset:
    return frozenset([(pair["left"]["source"], pair["left"]["id"]), (pair["right"]["source"], pair["right"]["id"])])


def union_of_candidates(client, k: int, min_score: float | None = None) -> dict[frozenset, float]:
    union: dict[frozenset, float] = {}
    for source, ids in IDS.items():
        for rid in ids:
            answer = client.get("/candidates", params={"dataset": "shop", "source": source, "id": rid, "k": k}).json()
            for hit in answer["candidates"]:
                if min_score is None or hit["score"] >= min_score:
                    union[frozenset([(source, rid), (hit["source"], hit["id"])])] = hit["score"]
    return union


@pytest.mark.parametrize("k", [1, 2, 10])
def test_export_is_the_union_of_candidates_each_pair_once(client, products, k):
    calibrate(client)
    pairs, cursor = lines(client.get("/datasets/shop/pairs", params={"k": k}))
    assert cursor is None
    keys = [key(pair) for pair in pairs]
    assert len(keys) == len(set(keys)), "each unordered pair once"
    union = union_of_candidates(client, k)
    assert set(keys) == set(union)
    for pair in pairs:
        assert pair["score"] == pytest.approx(union[key(pair)], abs=1e-5)
        assert pair["left"]["source"] == "a" and pair["right"]["source"] == "b"
        assert isinstance(pair["match"], bool) and 0.0 <= pair["probability"] <= 1.0
    a2b2 = next(p for p in pairs if key(p) == frozenset([("a", "a2"), ("b", "b2")]))
    assert a2b2["match"] is True


def test_export_min_score_and_uncalibrated(client, products):
    every, _ = lines(client.get("/datasets/shop/pairs", params={"k": 3}))
    assert all(pair["match"] is None and pair["probability"] is None for pair in every)
    middle = sorted(pair["score"] for pair in every)[len(every) // 2]
    kept, _ = lines(client.get("/datasets/shop/pairs", params={"k": 3, "min_score": middle}))
    assert {key(p) for p in kept} == {key(p) for p in every if p["score"] >= middle}
    assert set(map(key, kept)) == set(union_of_candidates(client, 3, middle))


def test_export_single_source_deduplication(client, drain):
    client.put("/datasets/dedup", json={})
    rows = [
        (f"r{i}", {"name": name}) for i, name in enumerate(["sony tv 55", "sony tv 55 inch", "canon camera", "mouse"])
    ]
    client.post("/records", json=records_body("dedup", "only", rows))
    drain()
    pairs, cursor = lines(client.get("/datasets/dedup/pairs", params={"k": 2}))
    assert cursor is None
    keys = [key(p) for p in pairs]
    assert len(keys) == len(set(keys)) and all(len(k) == 2 for k in keys)
    union: set[frozenset] = set()
    for rid, _ in rows:
        answer = client.get("/candidates", params={"dataset": "dedup", "source": "only", "id": rid, "k": 2}).json()
        union |= {frozenset([("only", rid), ("only", hit["id"])]) for hit in answer["candidates"]}
    assert set(keys) == union


def test_cursor_resumes_to_the_same_total(client, products, settings):
    whole, cursor = lines(client.get("/datasets/shop/pairs", params={"k": 3}))
    assert cursor is None
    settings.pairs_page_records = 2
    resumed: list[dict] = []
    cursors = []
    cursor = None
    while True:
        params = {"k": 3} | ({"cursor": cursor} if cursor else {})
        page, cursor = lines(client.get("/datasets/shop/pairs", params=params))
        resumed += page
        cursors.append(cursor)
        if cursor is None:
            break
    assert len(cursors) == 5, "9 records, 2 per response"
    assert sorted(map(json.dumps, resumed)) == sorted(map(json.dumps, whole))


def test_export_searches_in_batches(client, products, monkeypatch):
    searches: list[int] = []
    original = VectorIndex.search

    def counted(self, queries, k):
        searches.append(len(queries))
        return original(self, queries, k)

    monkeypatch.setattr(VectorIndex, "search", counted)
    lines(client.get("/datasets/shop/pairs", params={"k": 2}))
    # one chunk: one search of each source for the records, one of each for the back-check of earlier records
    assert len(searches) <= 4 and max(searches) >= 4


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"k": 0}, 422),
        ({"k": 1001}, 422),
        ({"min_score": 1.5}, 422),
        ({"min_score": -1.01}, 422),
        ({"cursor": "abc"}, 422),
        ({"cursor": "-1"}, 422),
    ],
)
def test_export_bounds(client, products, params, status):
    assert client.get("/datasets/shop/pairs", params=params).status_code == status


def test_export_unknown_dataset_and_empty(client):
    response = client.get("/datasets/nosuch/pairs")
    assert response.status_code == 404 and "PUT /datasets/nosuch" in response.json()["detail"]
    client.put("/datasets/empty", json={})
    assert lines(client.get("/datasets/empty/pairs")) == ([], None)


def test_cli_pairs_writes_the_csv(client, products, tmp_path, settings, monkeypatch):
    """`llmatch pairs DATASET --out FILE --k 2`, against the app of this test (its HTTP client stands in)."""
    calibrate(client)
    whole, _ = lines(client.get("/datasets/shop/pairs", params={"k": 2}))
    settings.pairs_page_records = 3  # the command follows the cursors
    monkeypatch.setattr(api_client.httpx, "Client", lambda **_: client)
    monkeypatch.setattr(client, "close", lambda: None)
    out = tmp_path / "pairs.csv"
    assert cli.main(["pairs", "shop", "--out", str(out), "--k", "2", "--url", "http://localhost"]) == 0
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(whole)
    assert list(rows[0]) == ["left_source", "left_id", "right_source", "right_id", "score", "match", "probability"]
    assert {(r["left_source"], r["left_id"], r["right_source"], r["right_id"]) for r in rows} == {
        (p["left"]["source"], p["left"]["id"], p["right"]["source"], p["right"]["id"]) for p in whole
    }
    assert {r["match"] for r in rows} <= {"true", "false"} and all(0 <= float(r["probability"]) <= 1 for r in rows)
