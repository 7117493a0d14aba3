"""Explanations on /match: each attribute's values embedded alone (through the content cache) and the
identifier tokens two records share or not; on SQLite and PostgreSQL with the real MiniLM encoder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import CountingPool, records_body
from fastapi.testclient import TestClient

from encoder_worker.encoders.base import EncoderInput
from encoder_worker.encoders.identifiers import identifier_tokens
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


def match(client, left: str, right: str, **extra) -> dict:
    params = dict(dataset="cams", left_source="a", left_id=left, right_source="a", right_id=right, **extra)
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


def explain_inline(client: TestClient, left: dict, right: dict) -> dict:
    body = {"dataset": "cams", "left": {"attributes": left}, "right": {"attributes": right}, "explain": True}
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
