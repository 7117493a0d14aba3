"""The candidate pairs a training job chooses its threshold for (``sampled_candidate_pairs``): an exact search over
the stored vectors, chunk by chunk, that finds what the in-memory search finds; on SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest

from llmatch.models import Dataset
from matching import pairs
from matching.pairs import candidate_pairs, draw, load_encoded, sampled_candidate_pairs
from tests.conftest import records_body


def stored(client, name: str):
    state = client.app.state.service
    session = state.session_factory()
    dataset = session.query(Dataset).filter_by(name=name).one()
    return session, dataset.id


def by_ids(records, found: dict[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    """Pairs keyed by row -> keyed by record id, smaller first."""
    out = {}
    for (i, j), score in found.items():
        a, b = int(records.ids[i]), int(records.ids[j])
        out[(min(a, b), max(a, b))] = score
    return out


@pytest.mark.parametrize("chunk", [20_000, 1, 2])
def test_every_record_with_its_nearest_as_the_in_memory_search_finds_them(client, products, monkeypatch, chunk):
    monkeypatch.setattr(pairs, "SCAN_RECORDS", chunk)  # 1: a record at a time, each chunk of one source
    session, dataset_id = stored(client, products)
    with session:
        records = load_encoded(session, dataset_id)
        for k in (1, 2):
            found = sampled_candidate_pairs(session, dataset_id, k, 100, seed=0)
            expected = by_ids(records, candidate_pairs(records, k))
            assert found.keys() == expected.keys()
            assert np.allclose([found[p] for p in expected], list(expected.values()), atol=1e-5)


def test_a_sample_of_queries_finds_their_pairs_only(client, products):
    session, dataset_id = stored(client, products)
    with session:
        records = load_encoded(session, dataset_id)
        drawn = draw(records.ids, 3, seed=7)
        assert len(drawn) == 3 and set(drawn) <= set(records.ids.tolist())
        assert list(draw(records.ids, 3, seed=7)) == list(drawn), "the same draw for the same seed"
        rows = [records.row_of()[int(i)] for i in drawn]
        found = sampled_candidate_pairs(session, dataset_id, 2, 3, seed=7)
        assert found.keys() == by_ids(records, candidate_pairs(records, 2, queries=rows)).keys()


def test_a_single_source_dataset_pairs_records_within_it(client, drain):
    assert client.put("/datasets/solo", json={}).status_code == 201
    rows = [(f"r{i}", {"name": name}) for i, name in enumerate(["red apple", "apple red", "blue car", "car blue"])]
    assert client.post("/records", json=records_body("solo", "only", rows)).status_code == 202
    drain()
    session, dataset_id = stored(client, "solo")
    with session:
        found = sampled_candidate_pairs(session, dataset_id, 1, 100, seed=0)
        records = load_encoded(session, dataset_id)
        assert found.keys() == by_ids(records, candidate_pairs(records, 1)).keys()
        assert all(a != b for a, b in found)
        assert sampled_candidate_pairs(session, dataset_id + 1000, 1, 100, seed=0) == {}
