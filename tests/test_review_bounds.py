"""/review on a dataset larger than review_max_records: each call reads a bounded number of vectors."""

from __future__ import annotations

import pytest

from llmatch.settings import Settings
from matching import pairs

BOUND = 4  # the products fixture holds 9 encoded records


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared fixture's settings, with the review bound below the fixture's record count."""
    return settings.model_copy(update={"review_max_records": BOUND})


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of stored vectors each decode in matching.pairs turns into arrays."""
    counts: list[int] = []
    real = pairs.stack

    def counting(blobs, dim):
        counts.append(len(blobs))
        return real(blobs, dim)

    monkeypatch.setattr(pairs, "stack", counting)
    return counts


def review(client) -> dict:
    response = client.get("/datasets/shop/review", params={"limit": 100})
    assert response.status_code == 200, response.text
    return response.json()


def test_review_reads_the_vectors_of_at_most_the_bound_of_records(products, client, decoded):
    page = review(client)
    assert 0 < sum(decoded) <= BOUND
    assert page["basis"] == "middle" and page["pairs"]
    assert review(client) == page, "the same sample while nothing changes"
    first = page["pairs"][0]
    label = {
        "left_source": first["left"]["source"],
        "left_id": first["left"]["id"],
        "right_source": first["right"]["source"],
        "right_id": first["right"]["id"],
        "label": 0,
    }
    assert client.put("/datasets/shop/labels", json={"pairs": [label]}).status_code == 200
    decoded.clear()
    after = review(client)
    assert sum(decoded) <= BOUND + 2, "the sample and the two labelled records"
    asked = {(p["left"]["id"], p["right"]["id"]) for p in after["pairs"]}
    assert (first["left"]["id"], first["right"]["id"]) not in asked


def test_the_sample_takes_records_outside_labels_first(products, client):
    state = client.app.state.service
    dataset_id = state.registry.keys()[0][0]
    held = sorted(int(i) for key in state.registry.keys() for i in state.registry.record_ids(key))
    avoided = held[:5]
    for seed in range(3):
        sample = pairs.query_sample(state.registry, dataset_id, BOUND, avoided, seed)
        assert sorted(sample.tolist()) == held[5:]
    shuffled = {tuple(pairs.query_sample(state.registry, dataset_id, BOUND, [], seed).tolist()) for seed in range(8)}
    assert len(shuffled) > 1, "the sample rotates with the seed"
