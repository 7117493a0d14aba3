"""Stored labels, calibration from them, and the review queue; on SQLite and PostgreSQL with the real MiniLM."""

from __future__ import annotations

import httpx
import pytest

from llmatch.terminal import label_queue

POSITIVES = [("a1", "b1"), ("a2", "b2"), ("a3", "b3"), ("a4", "b4")]
NEGATIVES = [("a1", "b2"), ("a2", "b3"), ("a3", "b4"), ("a4", "b5"), ("a1", "b5"), ("a2", "b1")]


def pair(left: str, right: str, label: int, left_source: str = "a", right_source: str = "b") -> dict:
    return {
        "left_source": left_source,
        "left_id": left,
        "right_source": right_source,
        "right_id": right,
        "label": label,
    }


def all_pairs() -> list[dict]:
    return [pair(a, b, 1) for a, b in POSITIVES] + [pair(a, b, 0) for a, b in NEGATIVES]


def labels(client) -> dict[tuple[str, str, str, str], int]:
    response = client.get("/datasets/shop/labels")
    assert response.status_code == 200
    body = response.json()
    assert body["total"] == len(body["pairs"])
    return {(p["left_source"], p["left_id"], p["right_source"], p["right_id"]): p["label"] for p in body["pairs"]}


def test_labels_are_stored_and_the_latest_label_of_a_pair_wins_in_either_order(products, client):
    response = client.put("/datasets/shop/labels", json={"pairs": [pair("a1", "b1", 1), pair("a1", "b2", 1)]})
    assert response.status_code == 200 and response.json() == {"stored": 2, "total": 2}
    mirrored = pair("b2", "a1", 0, left_source="b", right_source="a")
    assert client.put("/datasets/shop/labels", json={"pairs": [mirrored]}).json() == {"stored": 1, "total": 2}
    assert labels(client) == {("a", "a1", "b", "b1"): 1, ("a", "a1", "b", "b2"): 0}
    twice = [pair("a3", "b3", 0), pair("a3", "b3", 1)]  # in one batch too: the later one
    assert client.put("/datasets/shop/labels", json={"pairs": twice}).json() == {"stored": 1, "total": 3}
    assert labels(client)[("a", "a3", "b", "b3")] == 1


def test_delete_removes_every_label(products, client):
    client.put("/datasets/shop/labels", json={"pairs": all_pairs()})
    assert client.delete("/datasets/shop/labels").status_code == 204
    assert labels(client) == {}


def test_labels_of_an_unknown_dataset_are_404_and_bad_labels_422(products, client):
    response = client.put("/datasets/nosuch/labels", json={"pairs": [pair("a1", "b1", 1)]})
    assert response.status_code == 404 and "PUT /datasets/nosuch" in response.json()["detail"]
    assert client.put("/datasets/shop/labels", json={"pairs": [pair("a1", "b1", 2)]}).status_code == 422
    assert client.put("/datasets/shop/labels", json={"pairs": []}).status_code == 422


def test_calibrating_from_labels_equals_calibrating_on_the_same_pairs(products, client):
    explicit = client.post("/datasets/shop/calibrate", json={"pairs": all_pairs()}).json()
    client.put("/datasets/shop/labels", json={"pairs": all_pairs()})
    response = client.post("/datasets/shop/calibrate", json={"from": "labels", "objective": "f1"})
    assert response.status_code == 200, response.text
    assert explicit.pop("created_at") <= response.json()["created_at"]
    assert {k: v for k, v in response.json().items() if k != "created_at"} == explicit
    assert client.get("/datasets/shop").json()["calibration"]["threshold"] == explicit["threshold"]


def test_calibrating_from_labels_of_one_class_or_none_is_refused(products, client):
    response = client.post("/datasets/shop/calibrate", json={"from": "labels"})
    assert response.status_code == 409 and "no stored labels" in response.json()["detail"]
    client.put("/datasets/shop/labels", json={"pairs": [pair(a, b, 1) for a, b in POSITIVES]})
    response = client.post("/datasets/shop/calibrate", json={"from": "labels"})
    assert response.status_code == 409 and "non-matches (label 0)" in response.json()["detail"]
    both = client.post("/datasets/shop/calibrate", json={"from": "labels", "pairs": all_pairs()})
    assert both.status_code == 422 and "either" in both.json()["detail"]
    assert client.get("/datasets/shop").json()["calibration"] is None


def test_labels_of_deleted_records_sit_out_of_calibration(products, client):
    client.put("/datasets/shop/labels", json={"pairs": all_pairs() + [pair("a9", "b1", 0)]})
    # a9 never existed: its label is stored but not used; the others calibrate as before
    response = client.post("/datasets/shop/calibrate", json={"from": "labels"})
    assert response.status_code == 200 and response.json()["pairs"] == len(all_pairs())


def review(client, **params) -> dict:
    response = client.get("/datasets/shop/review", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_review_while_uncalibrated_asks_about_the_middle_of_the_scores_first(products, client):
    page = review(client, limit=5, strategy="uncertainty")
    assert page["basis"] == "middle" and len(page["pairs"]) == 5
    everything = review(client, limit=100, strategy="uncertainty")["pairs"]
    scores = [p["score"] for p in everything]
    middle = (min(scores) + max(scores)) / 2
    assert page["threshold"] == pytest.approx(middle)
    distances = [abs(p["score"] - middle) for p in everything]
    assert distances == sorted(distances)
    assert all(p["probability"] is None for p in everything)
    first = everything[0]
    assert first["left"]["source"] == "a" and first["right"]["source"] == "b"
    assert "name" in first["left"]["attributes"] and "name" in first["right"]["attributes"]
    assert len({(p["left"]["id"], p["right"]["id"]) for p in everything}) == len(everything) == 4 * 5
    default = review(client, limit=100)
    assert default["threshold"] == page["threshold"] and default["pairs"][0] == everything[0], "nearest first"
    assert sorted(map(str, default["pairs"])) == sorted(map(str, everything)), "the same pairs, in another order"


def test_review_leaves_out_labelled_pairs_in_either_order(products, client):
    first = review(client, limit=1)["pairs"][0]
    mirrored = pair(first["right"]["id"], first["left"]["id"], 0, left_source="b", right_source="a")
    client.put("/datasets/shop/labels", json={"pairs": [mirrored]})
    remaining = review(client, limit=100)["pairs"]
    assert len(remaining) == 19
    assert (first["left"]["id"], first["right"]["id"]) not in {(p["left"]["id"], p["right"]["id"]) for p in remaining}


def test_review_after_calibration_asks_nearest_the_threshold_with_probabilities(products, client):
    threshold = client.post("/datasets/shop/calibrate", json={"pairs": all_pairs()}).json()["threshold"]
    page = review(client, limit=100, strategy="uncertainty")
    assert page["basis"] == "calibration" and page["threshold"] == threshold
    distances = [abs(p["score"] - threshold) for p in page["pairs"]]
    assert distances == sorted(distances)
    assert all(0 <= p["probability"] <= 1 for p in page["pairs"])


def test_review_fits_a_threshold_on_labels_of_both_classes_before_calibration(products, client):
    client.put("/datasets/shop/labels", json={"pairs": [pair("a1", "b1", 1), pair("a1", "b5", 0)]})
    page = review(client, limit=3)
    assert page["basis"] == "labels"
    match = client.get(
        "/match", params=dict(dataset="shop", left_source="a", left_id="a1", right_source="b", right_id="b1")
    ).json()["score"]
    miss = client.get(
        "/match", params=dict(dataset="shop", left_source="a", left_id="a1", right_source="b", right_id="b5")
    ).json()["score"]
    assert miss < page["threshold"] < match


def test_diverse_review_asks_about_each_record_once_per_page_first(products, client):
    page = review(client, limit=4, strategy="diverse")["pairs"]
    records = [p["left"]["id"] for p in page] + [p["right"]["id"] for p in page]
    assert len(set(records)) == len(records) == 8


def test_review_of_an_unknown_or_empty_dataset(products, client):
    assert client.get("/datasets/nosuch/review").status_code == 404
    assert client.put("/datasets/empty", json={}).status_code == 201
    assert client.get("/datasets/empty/review").json() == {"pairs": [], "threshold": None, "basis": "none"}
    assert client.get("/datasets/shop/review", params={"limit": 0}).status_code == 422


def test_terminal_label_queue_stores_answers_and_recalibrates(products, client):
    answers = iter(["y", "n", "what?", "s", "y", "", "q"])  # "" accepts recalibration after the first round
    said: list[str] = []
    stored = label_queue(client, "shop", ask=lambda _prompt: next(answers), say=said.append, batch=4)
    assert stored == 3
    stored_labels = labels(client)
    assert sorted(stored_labels.values()) == [0, 1, 1]
    shown = [line for line in said if line.startswith("\n[")]
    assert len(shown) == 5 and "score" in shown[0] and "name" in shown[0]
    recalibrated = [line for line in said if line.startswith("threshold") or line.startswith("not recalibrated")]
    assert len(recalibrated) == 1


def test_terminal_label_queue_says_why_the_api_refused(products, client):
    from llmatch.terminal import ApiCallError

    with pytest.raises(ApiCallError, match="404"):
        label_queue(client, "nosuch", ask=lambda _p: "q", say=lambda _s: None)
    assert isinstance(client, httpx.Client)


def test_balanced_review_alternates_between_above_and_below_the_threshold(products, client):
    threshold = client.post("/datasets/shop/calibrate", json={"pairs": all_pairs()}).json()["threshold"]
    page = review(client, limit=6, strategy="balanced")["pairs"]
    assert [p["score"] >= threshold for p in page] == [True, False] * 3
    above = sorted((p for p in review(client, limit=100)["pairs"] if p["score"] >= threshold), key=lambda p: p["score"])
    assert [p["score"] for p in page[::2]] == [p["score"] for p in above[:3]], "nearest first on each side"
