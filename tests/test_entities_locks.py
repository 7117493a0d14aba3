"""Entity updates and other writers: a calibration's regrouping leaves SQLite's write lock to others, and
deleting a dataset while its entities are updated neither deadlocks nor fails on PostgreSQL."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from conftest import PRODUCTS_A, PRODUCTS_B, records_body
from sqlalchemy import make_url, select, update

from llmatch.db import transaction
from llmatch.models import Dataset, EntityMember, EntityState
from matching import entity_sync
from matching.grouping import Grouping

POSITIVES = [("a1", "b1"), ("a2", "b2"), ("a3", "b3"), ("a4", "b4")]
NEGATIVES = [("a1", "b2"), ("a2", "b3"), ("a3", "b4"), ("a4", "b5")]


def labelled_pairs() -> list[dict]:
    labelled = [(p, 1) for p in POSITIVES] + [(p, 0) for p in NEGATIVES]
    return [
        {"left_source": "a", "left_id": a, "right_source": "b", "right_id": b, "label": y} for (a, b), y in labelled
    ]


def write_beside(database_path: str) -> str | None:
    """Take SQLite's write lock from another connection, waiting at most 2 s: None, or why it failed. (Regrouping
    under the request's own write lock would make this wait out the whole timeout, however long: the request is
    blocked in this call.)"""
    connection = sqlite3.connect(database_path, timeout=2.0, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("UPDATE datasets SET instruction = instruction")
        connection.execute("COMMIT")
        return None
    except sqlite3.OperationalError as error:
        return str(error)
    finally:
        connection.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_calibrations_regrouping_leaves_the_write_lock_to_other_writers(products, client, database_url, monkeypatch):
    database_path = make_url(database_url).database
    outcomes: list[str | None] = []
    real_group = entity_sync.group

    def group_while_another_writes(*args, **kwargs):
        if threading.current_thread().name != "entities":  # the request's regrouping, not the follower's
            outcomes.append(write_beside(database_path))
        return real_group(*args, **kwargs)

    monkeypatch.setattr(entity_sync, "group", group_while_another_writes)
    response = client.post("/datasets/shop/calibrate", json={"pairs": labelled_pairs()})
    assert response.status_code == 200, response.text
    assert outcomes == [None], "another writer went on while the dataset was regrouped"
    with client.app.state.service.session_factory() as session:
        assert session.scalar(select(EntityState.calibration_id)) is not None
        assert session.query(EntityMember).count() == 9


def test_a_plan_made_for_an_older_calibration_is_not_stored(products, client):
    state = client.app.state.service
    assert client.post("/datasets/shop/calibrate", json={"pairs": labelled_pairs()}).status_code == 200
    grouping = Grouping.from_settings(state.settings)
    with transaction(state.session_factory) as session:
        dataset_id = session.scalar(select(Dataset.id).where(Dataset.name == "shop"))
        session.execute(update(EntityState).values(calibration_id=None))
    with state.session_factory() as session:
        plan = entity_sync.plan_regroup(session, state.registry, dataset_id, grouping)
    assert plan is not None
    assert client.post("/datasets/shop/calibrate", json={"pairs": labelled_pairs()}).status_code == 200
    with transaction(state.session_factory) as session:
        session.execute(update(EntityState).values(calibration_id=None))
    with transaction(state.session_factory) as session:
        assert entity_sync.sync(session, state.registry, dataset_id, grouping, None, plan) is False
    entity_sync.update_entities(state.session_factory, state.registry, dataset_id, grouping)
    with state.session_factory() as session:
        assert session.scalar(select(EntityState.calibration_id)) not in (None, plan.calibration_id)


@pytest.mark.parametrize("database_url", ["pg"], indirect=True)
def test_deleting_a_dataset_while_its_entities_are_regrouped_neither_deadlocks_nor_fails(client, drain):
    state = client.app.state.service
    for round_number in range(12):
        name = f"shop{round_number}"
        assert client.put(f"/datasets/{name}", json={}).status_code == 201
        assert client.post("/records", json=records_body(name, "a", PRODUCTS_A)).status_code == 202
        assert client.post("/records", json=records_body(name, "b", PRODUCTS_B)).status_code == 202
        drain()
        assert client.post(f"/datasets/{name}/calibrate", json={"pairs": labelled_pairs()}).status_code == 200
        with transaction(state.session_factory) as session:
            dataset_id = session.scalar(select(Dataset.id).where(Dataset.name == name))
            session.execute(update(EntityState).values(calibration_id=None))  # the next update regroups
        errors, statuses = race_delete_and_regroup(client, name, dataset_id, in_lock=round_number % 2 == 1)
        assert errors == [] and statuses == [204], f"round {round_number}: {errors} {statuses}"


def race_delete_and_regroup(client, name: str, dataset_id: int, in_lock: bool) -> tuple[list, list[int]]:
    """DELETE /datasets/NAME and a regrouping of its entities (as the follower does it, or wholly under the
    dataset's lock), started together; returns the regrouping's errors and the delete's status."""
    state = client.app.state.service
    grouping = Grouping.from_settings(state.settings)
    errors: list[BaseException] = []
    statuses: list[int] = []
    start = threading.Barrier(2)

    def regroup() -> None:
        start.wait()
        try:
            if in_lock:
                with transaction(state.session_factory) as session:
                    entity_sync.sync(session, state.registry, dataset_id, grouping, None)
            else:
                entity_sync.update_entities(state.session_factory, state.registry, dataset_id, grouping, None)
        except BaseException as error:  # noqa: BLE001 - reported by the caller
            errors.append(error)

    def delete() -> None:
        start.wait()
        statuses.append(client.delete(f"/datasets/{name}").status_code)

    threads = [threading.Thread(target=regroup), threading.Thread(target=delete)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors, statuses
