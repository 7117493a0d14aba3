"""Explanations on /match: each attribute's values embedded alone (through the content cache) and the
identifier tokens two records share or not; on SQLite and PostgreSQL with the real MiniLM encoder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import CountingPool, migrate_engine, records_body
from fastapi.testclient import TestClient
from sqlalchemy import func, insert, inspect, select

from encoding.encoder import EncoderInput
from encoding.identifiers import identifier_tokens
from encoding.render import RenderConfig, input_hash
from llmatch.db import make_engine, transaction
from llmatch.models import Dataset, Embedding, ExplanationVector, IndexChange, Record
from llmatch.settings import Settings
from service import explain as explaining
from service.app import create_app

CAMERA = {"title": "canon powershot digital camera 12 megapixel", "brand": "canon", "modelno": "sd-6100"}
# The same listing with another model number: the model number decides that these are different products.
OTHER_MODEL = {**CAMERA, "modelno": "sd-6110"}
NO_BRAND = {"title": "canon powershot digital camera 12 megapixel", "brand": None, "modelno": "SD6100"}


@pytest.fixture
def cameras(client, drain) -> str:
    assert client.put("/datasets/cams", json={}).status_code == 201
    rows = [("c1", CAMERA), ("c2", OTHER_MODEL), ("c3", NO_BRAND)]
    assert client.post("/records", json=records_body("cams", "a", rows)).status_code == 202
    drain()
    return "cams"


def match(client, left: str, right: str, dataset: str = "cams", **extra) -> dict:
    params = dict(dataset=dataset, left_source="a", left_id=left, right_source="a", right_id=right, **extra)
    response = client.get("/match", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_decisive_attribute_is_the_least_similar_and_its_codes_differ(cameras, client):
    answer = match(client, "c1", "c2", explain="true")
    attributes = {a["name"]: a for a in answer["explanation"]["attributes"]}
    assert list(attributes) == ["title", "brand", "modelno"]
    assert attributes["title"]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert attributes["brand"]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert attributes["modelno"]["similarity"] < 0.99
    assert min(attributes.values(), key=lambda a: a["similarity"])["name"] == "modelno"
    assert (attributes["modelno"]["left"], attributes["modelno"]["right"]) == ("sd-6100", "sd-6110")
    assert answer["explanation"]["identifiers"] == {"shared": [], "left_only": ["sd6100"], "right_only": ["sd6110"]}


def test_score_stays_the_whole_record_cosine(cameras, client):
    plain = match(client, "c1", "c2")
    explained = match(client, "c1", "c2", explain="true")
    assert "explanation" not in plain
    assert explained["score"] == pytest.approx(plain["score"], abs=1e-7)
    assert explained["score"] < 0.999, "whole records differ in one attribute: not a perfect cosine"


def test_a_missing_value_has_no_similarity_and_codes_agree_across_spellings(cameras, client):
    answer = match(client, "c1", "c3", explain="true")
    brand = next(a for a in answer["explanation"]["attributes"] if a["name"] == "brand")
    assert brand == {"name": "brand", "left": "canon", "right": None, "similarity": None}
    assert answer["explanation"]["identifiers"]["shared"] == ["sd6100"]
    assert answer["explanation"]["identifiers"]["left_only"] == []


def test_a_second_explanation_of_the_same_values_encodes_nothing(cameras, client, counting_pool):
    before = len(counting_pool.calls)
    match(client, "c1", "c2", explain="true")
    first = counting_pool.calls[before:]
    # title, brand and the two model numbers: each value alone, once (the shared ones are one text)
    assert sorted(item.text for item in first) == sorted(
        [
            "[title] canon powershot digital camera 12 megapixel [\\title]",
            "[brand] canon [\\brand]",
            "[modelno] sd-6100 [\\modelno]",
            "[modelno] sd-6110 [\\modelno]",
        ]
    )
    after_first = len(counting_pool.calls)
    match(client, "c2", "c1", explain="true")
    match(client, "c1", "c2", explain="true")
    assert len(counting_pool.calls) == after_first, "cached values must not be encoded again"


def test_post_match_explains_inline_records(cameras, client):
    body = {
        "dataset": "cams",
        "left": {"attributes": {"title": "canon powershot camera", "modelno": "sd-6100"}},
        "right": {"source": "a", "id": "c2"},
        "explain": True,
    }
    response = client.post("/match", json=body)
    assert response.status_code == 200, response.text
    explanation = response.json()["explanation"]
    assert [a["name"] for a in explanation["attributes"]] == ["title", "brand", "modelno"]
    assert explanation["attributes"][1]["left"] is None
    assert explanation["identifiers"]["left_only"] == ["sd6100"]
    assert "explanation" not in client.post("/match", json={**body, "explain": False}).json()


def test_explain_of_an_unknown_record_is_404(cameras, client):
    params = dict(dataset="cams", left_source="a", left_id="c1", right_source="a", right_id="nope", explain="true")
    response = client.get("/match", params=params)
    assert response.status_code == 404 and "nope" in response.json()["detail"]


@contextmanager
def limited_client(settings: Settings, pool: CountingPool, **limits) -> Iterator[TestClient]:
    """A client of an app whose settings differ from the fixture's by ``limits``."""
    app = create_app(settings.model_copy(update=limits), pool=pool, run_worker=False)
    with TestClient(app, base_url="http://localhost") as test_client:
        assert test_client.put("/datasets/cams", json={}).status_code == 201
        yield test_client


def explain_inline(client: TestClient, left: dict, right: dict, dataset: str = "cams") -> dict:
    body = {"dataset": dataset, "left": {"attributes": left}, "right": {"attributes": right}, "explain": True}
    response = client.post("/match", json=body)
    assert response.status_code == 200, response.text
    return response.json()["explanation"]


def values_embedded_alone(calls: list[EncoderInput]) -> list[str]:
    """The texts an explanation embedded: one tagged attribute each (a whole record has one tag per attribute)."""
    return [item.text for item in calls if item.text.count("[\\") == 1]


def test_a_value_of_the_longest_legal_length_is_cut_before_an_explanation_reads_it(
    cameras, client, counting_pool, settings, monkeypatch
):
    """'a-' * n took the identifier pattern quadratic time (17.6 s for one 65,536-character value, holding the
    GIL); every text an explanation reads or embeds is now cut to the text limit first."""
    scanned: list[int] = []

    def recording_identifier_tokens(text: str) -> set[str]:
        scanned.append(len(text))
        return identifier_tokens(text)

    monkeypatch.setattr(explaining, "identifier_tokens", recording_identifier_tokens)
    long_value = "a-" * 32_768
    before = len(counting_pool.calls)
    body = {
        "dataset": "cams",
        "left": {"attributes": {"title": long_value, "modelno": "sd-6100"}},
        "right": {"source": "a", "id": "c1"},
        "explain": True,
    }
    response = client.post("/match", json=body)

    assert response.status_code == 200, response.text
    title, _brand, modelno = response.json()["explanation"]["attributes"]
    assert title["left"] == long_value and title["similarity"] is not None
    assert modelno["similarity"] == pytest.approx(1.0, abs=1e-5)
    limit = settings.max_text_chars
    assert len(scanned) == 2 and max(scanned) <= limit + len(" sd-6100")
    embedded = values_embedded_alone(counting_pool.calls[before:])
    # the title cut to the limit and then tagged; the model number is one text on both sides
    assert len(embedded) == 3 and max(len(text) for text in embedded) == limit + len("[title]  [\\title]")


def test_an_explanation_embeds_at_most_the_limit_of_values(settings, counting_pool):
    left = {f"f{i:02}": f"left value {i}" for i in range(40)}
    right = {f"f{i:02}": f"right value {i}" for i in range(40)}
    with limited_client(settings, counting_pool, explain_max_values=8) as limited:
        before = len(counting_pool.calls)
        attributes = explain_inline(limited, left, right)["attributes"]
        embedded = values_embedded_alone(counting_pool.calls[before:])

    assert len(attributes) == 40
    assert [a["name"] for a in attributes if a["similarity"] is not None] == ["f00", "f01", "f02", "f03"]
    assert len(embedded) == 8


def test_an_explanation_embeds_at_most_the_limit_of_characters(settings, counting_pool):
    left = {"a": "l" * 300, "b": "m" * 300, "c": "short left"}
    right = {"a": "n" * 300, "b": "o" * 300, "c": "short right"}
    with limited_client(settings, counting_pool, explain_max_chars=1_000) as limited:
        before = len(counting_pool.calls)
        attributes = explain_inline(limited, left, right)["attributes"]
        embedded = values_embedded_alone(counting_pool.calls[before:])

    # a's two values fit (2 x 309 characters), b's would pass 1,000, c's still fit after a's
    assert [a["similarity"] is not None for a in attributes] == [True, False, True]
    assert sum(len(text) for text in embedded) <= 1_000 and len(embedded) == 4


# ------------------------------------------------------------------------------- each dataset's explanation cache


def count_rows(client: TestClient, model, *where) -> int:
    with client.app.state.service.session_factory() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


def explanation_hashes(client: TestClient, dataset: str) -> set[str]:
    with client.app.state.service.session_factory() as session:
        query = select(ExplanationVector.input_hash).join(Dataset).where(Dataset.name == dataset)
        return set(session.scalars(query))


def alone_hash(name: str, value: str) -> str:
    item = explaining.value_input(RenderConfig(), name, value)
    return input_hash(item.instruction, item.text)


def test_an_explanation_reads_and_writes_only_its_own_datasets_cache(cameras, client, drain, counting_pool):
    """A second dataset explaining the same values encodes them again: a row of the first dataset's would answer
    faster and so tell a key of the second what the first explained (and the records' cache is left alone)."""
    assert client.put("/datasets/twin", json={}).status_code == 201
    rows = [("c1", CAMERA), ("c2", OTHER_MODEL)]
    assert client.post("/records", json=records_body("twin", "a", rows)).status_code == 202
    drain()
    embeddings = count_rows(client, Embedding)

    before = len(counting_pool.calls)
    first = match(client, "c1", "c2", explain="true")["explanation"]
    in_cams = sorted(item.text for item in counting_pool.calls[before:])
    before = len(counting_pool.calls)
    second = match(client, "c1", "c2", dataset="twin", explain="true")["explanation"]
    in_twin = sorted(item.text for item in counting_pool.calls[before:])

    assert len(in_cams) == 4 and in_twin == in_cams
    assert second == first
    assert explanation_hashes(client, "cams") == explanation_hashes(client, "twin")
    assert len(explanation_hashes(client, "cams")) == 4
    assert count_rows(client, Embedding) == embeddings, "explanations must not write to the records' cache"


def test_deleting_a_dataset_leaves_no_vector_of_it(cameras, client, drain):
    assert client.put("/datasets/twin", json={}).status_code == 201
    assert client.post("/records", json=records_body("twin", "a", [("c1", CAMERA)])).status_code == 202
    drain()
    match(client, "c1", "c2", explain="true")
    # re-rendered records get new vectors: those of the old rendering must not outlive the dataset either
    assert client.put("/datasets/cams", json={"serialization": "plain"}).status_code == 200
    drain()
    match(client, "c1", "c3", explain="true")
    with client.app.state.service.session_factory() as session:
        twin_vector = session.scalar(
            select(Record.embedding_id).where(Record.external_id == "c1").join(Dataset).where(Dataset.name == "twin")
        )
    assert count_rows(client, ExplanationVector) > 0 and count_rows(client, Embedding) >= 4

    assert client.delete("/datasets/cams").status_code == 204

    assert count_rows(client, ExplanationVector) == 0
    with client.app.state.service.session_factory() as session:
        assert set(session.scalars(select(Embedding.id))) == {twin_vector}
    answer = match(client, "c1", "c1", dataset="twin")
    assert answer["score"] == pytest.approx(1.0, abs=1e-5)  # the identical record of the other dataset kept it


def test_deleting_a_dataset_deletes_the_vectors_its_records_held_before(cameras, client):
    """A vector a record let go of without deleting it (as re-queueing did before it deleted them) is found
    through the change log and deleted with the dataset."""
    with transaction(client.app.state.service.session_factory) as session:
        record = session.scalar(select(Record).where(Record.external_id == "c2"))
        released, record.embedding_id, record.status = record.embedding_id, None, "pending"
    assert released is not None

    assert client.delete("/datasets/cams").status_code == 204

    assert count_rows(client, Embedding) == 0


def test_the_explanation_cache_keeps_each_datasets_newest_vectors(settings, counting_pool):
    with limited_client(settings, counting_pool, explanation_cache_rows=3) as limited:
        assert limited.put("/datasets/other", json={}).status_code == 201
        explain_inline(limited, {"a": "one"}, {"a": "two"})
        explain_inline(limited, {"a": "one"}, {"a": "two"}, dataset="other")
        explain_inline(limited, {"a": "three"}, {"a": "four"})
        kept = explanation_hashes(limited, "cams")
        before = len(counting_pool.calls)
        explain_inline(limited, {"a": "one"}, {"a": "two"})
        encoded_again = counting_pool.calls[before:]
        other = explanation_hashes(limited, "other")

    first, newest = {alone_hash("a", "one"), alone_hash("a", "two")}, {alone_hash("a", v) for v in ("three", "four")}
    assert len(kept) == 3 and newest <= kept and len(kept & first) == 1  # the oldest row went
    assert len(encoded_again) == 2 + 1  # both inline records, then the one value no longer cached
    assert other == first, "another dataset's cache is its own: not purged by this one's"



def test_the_migration_gives_explanations_their_own_table_and_drops_their_rows_from_the_shared_cache(
    empty_database,
):
    engine = make_engine(empty_database)
    try:
        migrate_engine(engine, "0005")
        vector = b"\x00" * 16
        with engine.begin() as connection:
            dataset = connection.execute(
                insert(Dataset).values(name="d", encoder="minilm", seen_attributes=[]).returning(Dataset.id)
            ).scalar_one()
            ids = [
                connection.execute(
                    insert(Embedding)
                    .values(encoder_key="k", input_hash=h, dim=4, vector=vector)
                    .returning(Embedding.id)
                ).scalar_one()
                for h in ("record", "explanation", "logged")
            ]
            values = dict(dataset_id=dataset, source="s", attributes={}, content_hash="c", status="encoded")
            connection.execute(insert(Record).values(external_id="r", embedding_id=ids[0], **values))
            change = dict(dataset_id=dataset, source="s", record_id=7, embedding_id=ids[2])
            connection.execute(insert(IndexChange).values(**change))
        migrate_engine(engine, "0006")
        with engine.begin() as connection:
            assert set(connection.execute(select(Embedding.id)).scalars()) == {ids[0], ids[2]}
            row = dict(dataset_id=dataset, encoder_key="k", input_hash="h", dim=4, vector=vector)
            connection.execute(insert(ExplanationVector).values(**row))
            connection.execute(Dataset.__table__.delete())
            assert connection.execute(select(func.count()).select_from(ExplanationVector)).scalar() == 0
        migrate_engine(engine, "0005", down=True)
        assert "explanation_vectors" not in inspect(engine).get_table_names()
        migrate_engine(engine, "head")
    finally:
        engine.dispose()
