"""Serialization of records into the text an encoder embeds."""

from __future__ import annotations

from encoding.render import RenderConfig, content_hash, input_hash, render, value_text


def test_tagged_and_plain():
    record = {"title": "iPhone 12", "brand": "Apple", "price": 799.0, "note": None, "empty": ""}
    assert (
        render(record, RenderConfig("tagged"))
        == "[title] iPhone 12 [\\title] [brand] Apple [\\brand] [price] 799 [\\price]"
    )
    assert render(record, RenderConfig("plain")) == "iPhone 12 Apple 799"


def test_seen_order_then_record_order():
    assert render({"b": "2", "a": "1", "c": "3"}, RenderConfig("plain"), seen_order=["a", "b"]) == "1 2 3"


def test_fixed_attributes_select_and_order():
    config = RenderConfig("plain", attributes=["price", "title"])
    assert render({"title": "tv", "price": 5, "brand": "x"}, config) == "5 tv"


def test_numbers_as_text():
    assert value_text(3.0) == "3" and value_text(2.5) == "2.5" and value_text(7) == "7" and value_text(None) == ""


def test_hashes():
    assert content_hash({"a": 1, "b": 2}) == content_hash({"b": 2, "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": "1"})
    assert input_hash("find", "x") != input_hash(None, "x") and input_hash(None, "x") == input_hash("", "x")
