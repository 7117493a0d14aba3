"""Every endpoint of the contract, on SQLite and PostgreSQL, with the real MiniLM encoder."""

from __future__ import annotations

import numpy as np
from conftest import PRODUCTS_A


def test_dataset_lifecycle(client):
    created = client.put("/datasets/shop", json={"serialization": "plain", "instruction": "Find the product"})
    assert created.status_code == 201
    assert created.json()["encoder"] == "minilm" and created.json()["serialization"] == "plain"
    updated = client.put("/datasets/shop", json={"attributes": ["name"]})
    assert updated.status_code == 200
    assert updated.json()["attributes"] == ["name"] and updated.json()["instruction"] == "Find the product"
    assert [d["name"] for d in client.get("/datasets").json()["datasets"]] == ["shop"]
    assert client.get("/datasets/shop").json()["calibration"] is None
    assert client.delete("/datasets/shop").status_code == 204
    assert client.get("/datasets/shop").status_code == 404


def test_put_without_body_creates_with_defaults(client):
    response = client.put("/datasets/plain-defaults")
    assert response.status_code == 201
    assert response.json()["serialization"] == "tagged" and response.json()["attributes"] is None


def test_records_counts_per_source_and_status(products, client):
    info = client.get(f"/datasets/{products}").json()
    assert info["records"]["a"] == {"pending": 0, "encoded": 4, "failed": 0, "total": 4}
    assert info["records"]["b"]["encoded"] == 5
    assert info["totals"]["total"] == 9


def test_get_record_shows_rendered_text_and_status(products, client):
    record = client.get("/records/shop/a/a1").json()
    assert record["status"] == "encoded"
    assert record["text"] == "[name] sony bravia 55 inch 4k tv kd55x85j [\\name] [price] 899 [\\price]"


def test_match_of_stored_records(products, client):
    same = client.get(
        "/match", params=dict(dataset="shop", left_source="a", left_id="a2", right_source="b", right_id="b2")
    ).json()
    other = client.get(
        "/match", params=dict(dataset="shop", left_source="a", left_id="a2", right_source="b", right_id="b5")
    ).json()
    assert same["score"] > other["score"]
    assert same["threshold"] is None and same["match"] is None and same["probability"] is None


def test_match_score_is_the_cosine_of_the_two_embeddings(products, client, pool):
    score = client.get(
        "/match", params=dict(dataset="shop", left_source="a", left_id="a1", right_source="b", right_id="b1")
    ).json()["score"]
    left = client.get("/records/shop/a/a1").json()["text"]
    right = client.get("/records/shop/b/b1").json()["text"]
    from encoding.encoder import EncoderInput

    vectors = pool.encode("minilm", [EncoderInput(None, left), EncoderInput(None, right)])
    assert abs(score - float(np.dot(vectors[0], vectors[1]))) < 1e-5


def test_post_match_inline_and_ref(products, client, counting_pool):
    body = {
        "dataset": "shop",
        "left": {"attributes": {"name": "canon r6 body only"}},
        "right": {"source": "b", "id": "b2"},
    }
    response = client.post("/match", json=body)
    assert response.status_code == 200 and response.json()["score"] > 0.5
    assert client.get("/records/shop/b/b2").status_code == 200
    assert client.get("/datasets/shop").json()["totals"]["total"] == 9, "inline records are not stored"


def test_post_match_reuses_the_vector_of_a_stored_identical_text(products, client, counting_pool):
    calls = len(counting_pool.calls)
    name, price = PRODUCTS_A[0][1]["name"], PRODUCTS_A[0][1]["price"]
    body = {
        "dataset": "shop",
        "left": {"attributes": {"name": name, "price": price}},
        "right": {"source": "a", "id": "a1"},
    }
    assert abs(client.post("/match", json=body).json()["score"] - 1.0) < 1e-5
    assert len(counting_pool.calls) == calls


def test_candidates_of_stored_record(products, client):
    response = client.get("/candidates", params=dict(dataset="shop", source="a", id="a3", k=3))
    candidates = response.json()["candidates"]
    assert [c["id"] for c in candidates][0] == "b3"
    assert len(candidates) == 3 and all(c["source"] == "b" for c in candidates)
    assert [c["score"] for c in candidates] == sorted((c["score"] for c in candidates), reverse=True)


def test_candidates_in_own_source_never_return_the_query(products, client):
    candidates = client.get(
        "/candidates", params=dict(dataset="shop", source="a", id="a1", k=10, target_source="a")
    ).json()["candidates"]
    assert {c["id"] for c in candidates} == {"a2", "a3", "a4"}


def test_post_candidates_inline(products, client):
    body = {"dataset": "shop", "record": {"attributes": {"name": "bose qc 45 headset"}}, "k": 2}
    candidates = client.post("/candidates", json=body).json()["candidates"]
    assert candidates[0]["source"] == "b" and candidates[0]["id"] == "b4"
    assert candidates[1]["source"] == "a" and candidates[1]["id"] == "a4"  # every source of the dataset


def _pairs():
    positives = [("a1", "b1"), ("a2", "b2"), ("a3", "b3"), ("a4", "b4")]
    negatives = [("a1", "b2"), ("a2", "b3"), ("a3", "b4"), ("a4", "b5"), ("a1", "b5"), ("a2", "b1")]
    labelled = [(pair, 1) for pair in positives] + [(pair, 0) for pair in negatives]
    return [
        {"left_source": "a", "left_id": left, "right_source": "b", "right_id": right, "label": label}
        for (left, right), label in labelled
    ]


def test_calibrate_then_decide(products, client):
    response = client.post("/datasets/shop/calibrate", json={"pairs": _pairs(), "objective": "f1"})
    assert response.status_code == 200
    result = response.json()
    assert result["pairs"] == 10 and result["positives"] == 4
    assert result["f1"] == 1.0, "these product pairs are separable for MiniLM"
    assert client.get("/datasets/shop").json()["calibration"]["threshold"] == result["threshold"]
    match = client.get(
        "/match", params=dict(dataset="shop", left_source="a", left_id="a2", right_source="b", right_id="b2")
    ).json()
    assert match["match"] is True and match["threshold"] == result["threshold"] and match["probability"] > 0.5
    miss = client.get(
        "/match", params=dict(dataset="shop", left_source="a", left_id="a2", right_source="b", right_id="b5")
    ).json()
    assert miss["match"] is False and miss["probability"] < match["probability"]
    candidates = client.get("/candidates", params=dict(dataset="shop", source="a", id="a2", k=2)).json()
    assert [c["match"] for c in candidates["candidates"]] == [True, False]


def test_config_change_requeues_and_drops_calibration(products, client, drain):
    client.post("/datasets/shop/calibrate", json={"pairs": _pairs()})
    before = client.get("/records/shop/a/a1").json()["text"]
    response = client.put("/datasets/shop", json={"serialization": "plain"})
    info = response.json()
    assert info["totals"]["pending"] == 9 and info["calibration"] is None
    assert client.get("/candidates", params=dict(dataset="shop", source="a", id="a1")).status_code == 409
    drain()
    after = client.get("/records/shop/a/a1").json()
    assert after["status"] == "encoded" and after["text"] != before and after["text"].startswith("sony bravia")


def test_same_config_put_does_not_requeue(products, client):
    client.put("/datasets/shop", json={"serialization": "tagged"})
    assert client.get("/datasets/shop").json()["totals"]["encoded"] == 9


def test_delete_record_removes_it_from_candidates(products, client, drain):
    assert client.delete("/records/shop/b/b3").status_code == 204
    assert client.get("/records/shop/b/b3").status_code == 404
    candidates = client.get("/candidates", params=dict(dataset="shop", source="a", id="a3", k=10)).json()
    assert "b3" not in {c["id"] for c in candidates["candidates"]}


def test_delete_dataset_removes_records_vectors_and_calibration(products, client):
    from sqlalchemy import func, select

    from llmatch.models import Calibration, Embedding, Record

    client.post("/datasets/shop/calibrate", json={"pairs": _pairs()})
    assert client.delete("/datasets/shop").status_code == 204
    with client.app.state.service.session_factory() as session:
        for model in (Record, Embedding, Calibration):
            assert session.scalar(select(func.count()).select_from(model)) == 0
    assert client.put("/datasets/shop", json={}).status_code == 201
    assert client.get("/datasets/shop").json()["totals"]["total"] == 0


def test_operations_endpoints(products, client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": True, "indexes": True}
    metrics = client.get("/metrics").text
    assert 'llmatch_records{status="encoded"} 9.0' in metrics
    assert "llmatch_http_requests_total" in metrics and "llmatch_records_encoded_total" in metrics
    assert client.get("/openapi.json").json()["info"]["title"] == "llmatch"
    assert client.get("/docs").status_code == 200


def test_inline_encoding_with_a_vanished_model_folder_is_503(client, counting_pool, tmp_path):
    from encoding.registry import EncoderSpec

    folder = tmp_path / "model"
    folder.mkdir()
    counting_pool.add(EncoderSpec("vanishing", "sentence-transformers", str(folder)))
    assert client.put("/datasets/gone", json={"encoder": "vanishing"}).status_code == 201
    folder.rmdir()
    inline = {"attributes": {"name": "tv"}}
    response = client.post("/match", json={"dataset": "gone", "left": inline, "right": inline})
    assert response.status_code == 503
    assert "does not exist" in response.json()["detail"]
