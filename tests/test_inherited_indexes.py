"""An API process given indexes another process loaded (``llmatch serve --workers N``, a child forked again after
records changed) applies the change log before it answers, instead of answering from the inherited snapshot."""

from __future__ import annotations

from conftest import PRODUCTS_A, PRODUCTS_B, records_body
from sqlalchemy import select

from llmatch.db import make_session_factory
from llmatch.models import Dataset
from service.state import ServiceState, connect, load_indexes


def test_a_process_given_loaded_indexes_catches_up_with_the_log_before_it_serves(
    settings, counting_pool, client, drain
) -> None:
    engine = connect(settings)
    inherited = load_indexes(settings, make_session_factory(engine), counting_pool)  # the parent's load: empty
    engine.dispose()
    assert client.put("/datasets/shop", json={}).status_code == 201
    assert client.post("/records", json=records_body("shop", "a", PRODUCTS_A)).status_code == 202
    assert client.post("/records", json=records_body("shop", "b", PRODUCTS_B)).status_code == 202
    drain()  # encoded and logged after the parent loaded

    state = ServiceState.open(settings, counting_pool, run_worker=False, loaded=inherited, save_indexes=False)
    try:
        with state.session_factory() as session:
            dataset_id = session.scalar(select(Dataset.id).where(Dataset.name == "shop"))
        assert state.registry.size((dataset_id, "a")) == len(PRODUCTS_A)
        assert state.registry.size((dataset_id, "b")) == len(PRODUCTS_B)
    finally:
        state.close()
