"""Batch forms of POST /candidates ("records") and POST /match ("pairs"), contract v1.2: limits, per-item errors
in place, answers equal to the single forms item by item, one encoder call, one index search per target source."""

from __future__ import annotations

import pytest
from conftest import records_body

from matching.index import VectorIndex
from service.schemas import MAX_BATCH_PAIRS, MAX_BATCH_RECORDS

REFS = [{"source": s, "id": i} for s, i in [("a", "a1"), ("a", "a2"), ("b", "b3"), ("b", "b5"), ("a", "a4")]]
INLINE = [{"attributes": {"name": "sony 4k tv 55 inch"}}, {"attributes": {"name": "logitech mouse mx"}}]
LABELLED = [("a1", "b1", 1), ("a2", "b2", 1), ("a3", "b3", 1), ("a4", "b4", 1)] + [
    ("a1", "b2", 0),
    ("a2", "b3", 0),
    ("a3", "b4", 0),
    ("a4", "b5", 0),
    ("a1", "b5", 0),
    ("a2", "b1", 0),
]


def calibrate(client) -> None:
    pairs = [{"left_source": "a", "left_id": x, "right_source": "b", "right_id": y, "label": v} for x, y, v in LABELLED]
    assert client.post("/datasets/shop/calibrate", json={"pairs": pairs}).status_code == 200


def single_candidates(client, item: dict, k: int, target: str | None = None) -> dict:
    if "attributes" in item:
        body = {"dataset": "shop", "record": item, "k": k} | ({"target_source": target} if target else {})
        response = client.post("/candidates", json=body)
    else:
        params = {"dataset": "shop", "source": item["source"], "id": item["id"], "k": k}
        response = client.get("/candidates", params=params | ({"target_source": target} if target else {}))
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("target", [None, "b"])
def test_batch_candidates_equal_single_answers(client, products, target):
    calibrate(client)
    items = REFS + INLINE
    response = client.post(
        "/candidates",
        json={"dataset": "shop", "records": items, "k": 3} | ({"target_source": target} if target else {}),
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(items)
    for item, result in zip(items, results, strict=True):
        single = single_candidates(client, item, 3, target)
        assert [(c["source"], c["id"], c["match"]) for c in result["candidates"]] == [
            (c["source"], c["id"], c["match"]) for c in single["candidates"]
        ]
        assert [c["score"] for c in result["candidates"]] == pytest.approx([c["score"] for c in single["candidates"]])


def test_batch_candidates_one_encoder_call_and_one_search_per_target(client, products, counting_pool, monkeypatch):
    searches: list[int] = []
    original = VectorIndex.search

    def counted(self, queries, k):
        searches.append(len(queries))
        return original(self, queries, k)

    monkeypatch.setattr(VectorIndex, "search", counted)
    counting_pool.calls.clear()
    calls_before = len(counting_pool.calls)
    items = REFS + INLINE + [INLINE[0]]  # the same text twice is encoded once
    response = client.post("/candidates", json={"dataset": "shop", "records": items, "k": 2})
    assert response.status_code == 200
    assert len(counting_pool.calls) - calls_before == 2
    assert len(searches) == 2, "one search of source a and one of source b for the whole batch"
    # a refs search b, b refs search a, inline ones search both
    assert sorted(searches) == [2 + 3, 3 + 3]


def test_batch_candidates_report_bad_items_in_place(client, products, drain):
    client.post("/records", json=records_body("shop", "a", [("pending", {"name": "not yet"})]))
    items = [
        REFS[0],
        {"source": "a", "id": "nosuch"},
        {"source": "a", "id": "pending"},
        {"attributes": {"name": ["a", "list"]}},
        "a string",
        {"source": "a"},
        INLINE[0],
    ]
    response = client.post("/candidates", json={"dataset": "shop", "records": items, "k": 2})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results[0]["candidates"]) == 2 and len(results[-1]["candidates"]) == 2
    statuses = [r.get("error", {}).get("status") for r in results]
    assert statuses == [None, 404, 409, 422, 422, 422, None]
    assert "'nosuch'" in results[1]["error"]["detail"] and "pending" in results[2]["error"]["detail"]
    assert "'name'" in results[3]["error"]["detail"] and "item 3" in results[3]["error"]["detail"]
    assert "id" in results[5]["error"]["detail"]


def test_batch_match_equals_single_answers_and_reports_bad_pairs(client, products):
    calibrate(client)
    pairs = [
        {"left": {"source": "a", "id": "a1"}, "right": {"source": "b", "id": "b1"}},
        {"left": INLINE[0], "right": {"source": "b", "id": "b1"}},
        {"left": {"source": "a", "id": "a2"}, "right": INLINE[1]},
        {"left": {"source": "a", "id": "zz"}, "right": {"source": "b", "id": "b1"}},
        {"left": {"source": "a", "id": "a1"}},
        {"left": {"attributes": {"x": True}}, "right": {"source": "b", "id": "b1"}},
        {"left": {"source": "a", "id": "a3"}, "right": {"source": "b", "id": "b3"}},
    ]
    response = client.post("/match", json={"dataset": "shop", "pairs": pairs})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(pairs)
    assert [r.get("error", {}).get("status") for r in results] == [None, None, None, 404, 422, 422, None]
    for pair, result in zip(pairs, results, strict=True):
        if "error" in result:
            continue
        single = client.post("/match", json={"dataset": "shop", **pair}).json()
        assert result.keys() == single.keys()
        assert result["score"] == pytest.approx(single["score"])
        assert (result["match"], result["threshold"]) == (single["match"], single["threshold"])
        assert result["probability"] == pytest.approx(single["probability"], rel=1e-6, abs=1e-6)  # scores: batch noise
    assert results[0]["match"] is True and results[6]["match"] is True


@pytest.mark.parametrize(
    ("route", "body", "fragment"),
    [
        ("/candidates", {"records": [{"source": "a", "id": "a1"}] * (MAX_BATCH_RECORDS + 1)}, "1000"),
        ("/candidates", {"records": []}, "records"),
        ("/candidates", {"records": [INLINE[0]], "record": INLINE[0]}, "not both"),
        ("/candidates", {"records": [INLINE[0]], "k": 1001}, "k"),
        ("/candidates", {"k": 3}, "record"),
        ("/match", {"pairs": [{"left": REFS[0], "right": REFS[2]}] * (MAX_BATCH_PAIRS + 1)}, "10000"),
        ("/match", {"pairs": []}, "pairs"),
        ("/match", {"pairs": [{"left": REFS[0], "right": REFS[2]}], "left": REFS[0]}, "not both"),
        ("/match", {"pairs": [{"left": REFS[0], "right": REFS[2]}], "explain": True}, "explain"),
        ("/match", {"right": REFS[0]}, "left"),
    ],
    ids=[
        "records-1001",
        "records-empty",
        "record-and-records",
        "records-k-1001",
        "neither-record-nor-records",
        "pairs-10001",
        "pairs-empty",
        "pairs-and-left",
        "pairs-with-explain",
        "neither-left-nor-pairs",
    ],
)
def test_batch_limits_and_forms_refuse_the_whole_batch(client, products, route, body, fragment):
    response = client.post(route, json={"dataset": "shop", **body})
    assert response.status_code == 422, response.text
    assert fragment in response.json()["detail"]


def test_whole_batch_failures(client, products):
    unknown = client.post("/candidates", json={"dataset": "nosuch", "records": REFS})
    assert unknown.status_code == 404 and "PUT /datasets/nosuch" in unknown.json()["detail"]
    unknown = client.post("/match", json={"dataset": "nosuch", "pairs": [{"left": REFS[0], "right": REFS[2]}]})
    assert unknown.status_code == 404
    target = client.post("/candidates", json={"dataset": "shop", "records": REFS, "target_source": "zz"})
    assert target.status_code == 404 and "'zz'" in target.json()["detail"]


def test_batch_limits_are_in_the_openapi(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["CandidatesBatchIn"]["properties"]["records"]["maxItems"] == MAX_BATCH_RECORDS
    assert schema["MatchBatchIn"]["properties"]["pairs"]["maxItems"] == MAX_BATCH_PAIRS
