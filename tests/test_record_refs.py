"""Looking records and labels up by reference costs the same in a small and in a large dataset: the lookups use
the unique indexes (a row-value ``IN`` made SQLite visit every record of the dataset: 42 ms per GET /match at
100,000 records). Measured in SQLite virtual-machine steps, not time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import event, insert
from sqlalchemy.orm import Session

from llmatch.db import make_engine, make_session_factory
from llmatch.migrate import upgrade_to_head
from llmatch.models import ENCODED, Dataset, Embedding, Label, Record
from service.decisions import _encoded_vectors, _stored_rows
from service.labels import encoded_refs, put_labels, stored_labels
from service.review import _labelled_records
from service.schemas import LabelledPair

SMALL, LARGE = 200, 4000
REFS = [("a", "7"), ("b", "11"), ("a", "19")]
PAIRS = [("a", "7", "b", "11"), ("a", "19", "b", "11")]


class StepCounter:
    """Counts SQLite virtual-machine instructions (in hundreds) of the connections it is installed on."""

    def __init__(self) -> None:
        self.steps = 0

    def tick(self) -> int:
        self.steps += 1
        return 0  # go on


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Callable, StepCounter]]:
    path: Path = tmp_path_factory.mktemp("refs") / "llmatch.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    counter = StepCounter()
    event.listen(engine, "connect", lambda connection, _: connection.set_progress_handler(counter.tick, 100))
    upgrade_to_head(engine)
    factory = make_session_factory(engine)
    with factory.begin() as session:
        for name, size in (("small", SMALL), ("large", LARGE)):
            _fill(session, name, size)
    yield factory, counter
    engine.dispose()


def _fill(session: Session, name: str, size: int) -> None:
    dataset = Dataset(name=name, encoder="minilm")
    session.add(dataset)
    session.flush()
    embedding = Embedding(encoder_key="k", input_hash=name, dim=2, vector=b"\0" * 8)
    session.add(embedding)
    session.flush()
    rows = [
        dict(dataset_id=dataset.id, source=source, external_id=str(i), attributes={}, content_hash="h",
             status=ENCODED, embedding_id=embedding.id)
        for source in ("a", "b") for i in range(size)
    ]  # fmt: skip
    session.execute(insert(Record), rows)
    labels = [
        dict(dataset_id=dataset.id, left_source="a", left_id=str(i), right_source="b", right_id=str(i + 1), label=1)
        for i in range(size)
    ]
    session.execute(insert(Label), labels)


@contextmanager
def _counted(store, name: str) -> Iterator[tuple[Session, Dataset, StepCounter]]:
    factory, counter = store
    with factory() as session:
        dataset = session.query(Dataset).filter_by(name=name).one()
        counter.steps = 0
        yield session, dataset, counter
        session.rollback()


LOOKUPS = {
    "stored rows (GET and POST /match, /candidates)": lambda s, d: _stored_rows(s, d, REFS),
    "encoded vectors (POST /match pairs)": lambda s, d: _encoded_vectors(s, d, set(REFS)),
    "encoded refs (labels)": lambda s, d: encoded_refs(s, d.id, set(REFS)),
    "labelled records (review)": lambda s, d: _labelled_records(s, d.id, {key: 1 for key in PAIRS}),
    "stored labels (PUT /labels)": lambda s, d: stored_labels(s, d, set(PAIRS)),
}


@pytest.mark.parametrize("lookup", list(LOOKUPS))
def test_a_lookup_by_reference_does_not_grow_with_the_dataset(store, lookup):
    steps = {}
    for name in ("small", "large"):
        with _counted(store, name) as (session, dataset, counter):
            LOOKUPS[lookup](session, dataset)
            session.flush()
            steps[name] = counter.steps
    # 20 times the records: a scan of the dataset would cost about 20 times the steps
    assert steps["large"] <= 1.5 * steps["small"] + 5, steps


def test_put_labels_updates_only_the_pairs_named(store):
    """The label conditions select a superset (the sources' ids crossed): only the pairs asked for change."""
    factory, _ = store
    with factory() as session:
        dataset = session.query(Dataset).filter_by(name="small").one()
        pairs = [LabelledPair(left_source="a", left_id="3", right_source="b", right_id="5", label=0),
                 LabelledPair(left_source="a", left_id="4", right_source="b", right_id="5", label=0)]  # fmt: skip
        put_labels(session, dataset, pairs, max_labels=10_000)
        session.flush()
        labels = {(r.left_id, r.right_id): r.label for r in session.query(Label).filter_by(dataset_id=dataset.id)}
        session.rollback()
    assert labels[("3", "4")] == 1 and labels[("4", "5")] == 0 and labels[("3", "5")] == 0
    assert len(labels) == SMALL + 1
