"""Explanations on /match: each attribute's values embedded alone (through the content cache) and the
identifier tokens two records share or not; on SQLite and PostgreSQL with the real MiniLM encoder."""

from __future__ import annotations

import pytest
from conftest import records_body

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
