"""The service with an LLM2Vec encoder chosen by configuration (a tiny Llama built by the tests)."""

from __future__ import annotations

import numpy as np
from conftest import PRODUCTS_A, PRODUCTS_B, records_body
from tiny_llama import HIDDEN_SIZE, build_tiny_llama

from encoding.encoder import EncoderInput
from encoding.registry import EncoderSpec


def test_dataset_on_an_llm2vec_encoder(client, drain, counting_pool, tmp_path):
    folder = build_tiny_llama(tmp_path / "tiny-llama")
    counting_pool.add(EncoderSpec("tiny", "llm2vec", str(folder), batch_size=4))
    response = client.put("/datasets/llm", json={"encoder": "tiny", "instruction": "find the same product"})
    assert response.status_code == 201 and response.json()["encoder"] == "tiny"
    client.post("/records", json=records_body("llm", "a", PRODUCTS_A))
    client.post("/records", json=records_body("llm", "b", PRODUCTS_B))
    drain()
    assert client.get("/datasets/llm").json()["totals"]["encoded"] == 9
    assert {call.instruction for call in counting_pool.calls} == {"find the same product"}

    params = dict(dataset="llm", left_source="a", left_id="a1", right_source="b", right_id="b1")
    score = client.get("/match", params=params).json()["score"]
    texts = [client.get(f"/records/llm/{s}/{i}").json()["text"] for s, i in (("a", "a1"), ("b", "b1"))]
    vectors = counting_pool.encode("tiny", [EncoderInput("find the same product", t) for t in texts])
    assert vectors.shape == (2, HIDDEN_SIZE)
    assert abs(score - float(np.dot(vectors[0], vectors[1]))) < 1e-5
    candidates = client.get("/candidates", params=dict(dataset="llm", source="a", id="a1", k=5)).json()
    assert len(candidates["candidates"]) == 5
