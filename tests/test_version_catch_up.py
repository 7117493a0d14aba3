"""A request that reads a dataset's new encoder version from the database before this process has applied the
switch to its indexes catches up (applies the change log) instead of comparing vectors of two versions."""

from __future__ import annotations

import numpy as np
import pytest

from matching.errors import IndexBehind
from matching.neighbours import neighbours


def quiet_follower(state) -> None:
    """Stop the background follower, so that only requests apply the log (the entity follower stops with it)."""
    state.synchronizer.stop_event.set()
    for thread in state.threads:
        if thread.name == "index-sync":
            thread.join(timeout=10)


def test_a_search_ahead_of_the_indexes_catches_up_first(client, products):
    state = client.app.state.service
    quiet_follower(state)
    dataset_id = next(iter(state.registry.keys()))[0]
    assert state.registry.serving_encoders[dataset_id] == "minilm"
    state.registry.serving_encoders[dataset_id] = "shop.v1-abcdef"  # as if the indexes held another version
    polls = []
    original = state.synchronizer.poll
    state.synchronizer.poll = lambda: polls.append(1) or original()
    for request in (
        lambda: client.get("/candidates?dataset=shop&source=a&id=a1&k=2"),
        lambda: client.post("/candidates", json={"dataset": "shop", "record": {"attributes": {"name": "tv"}}, "k": 2}),
        lambda: client.get("/datasets/shop/review?limit=3"),
    ):
        state.registry.serving_encoders[dataset_id] = "shop.v1-abcdef"
        answer = request()
        assert answer.status_code == 200, answer.text
    assert len(polls) == 3, "each request applied the change log before searching"
    assert state.registry.serving_encoders[dataset_id] == "minilm"


def test_a_process_that_cannot_catch_up_answers_503_not_a_mixed_answer(client, products):
    state = client.app.state.service
    quiet_follower(state)
    dataset_id = next(iter(state.registry.keys()))[0]
    state.synchronizer.poll = lambda: 0  # the log does not bring the version (e.g. the database is unreachable)
    state.registry.serving_encoders[dataset_id] = "shop.v1-abcdef"
    answer = client.get("/candidates?dataset=shop&source=a&id=a1&k=2")
    assert answer.status_code == 503
    assert "switching to a new encoder version" in answer.json()["detail"]


def test_queries_of_another_dimension_than_the_index_are_refused_by_the_engine(client, products):
    state = client.app.state.service
    dataset_id = next(iter(state.registry.keys()))[0]
    with state.session_factory() as session, pytest.raises(IndexBehind):
        neighbours(session, state.registry, dataset_id, np.ones((1, 7), dtype=np.float32), 2, sources=["a"])
