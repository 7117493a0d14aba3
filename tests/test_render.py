"""Serialization of records into the text an encoder embeds, and the recipe that gives it with its hash."""

from __future__ import annotations

from types import SimpleNamespace

from encoding.encoder import EncoderInput
from encoding.manifest import write_manifest
from encoding.recipe import Recipe, record_input, render_options
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


def test_recipe_is_render_and_hash_with_the_dataset_settings():
    dataset = SimpleNamespace(
        serialization="tagged", attributes=None, instruction="find the product", seen_attributes=["brand", "title"]
    )
    record = {"title": "iPhone 12 " * 20, "brand": "Apple", "price": 799.0}
    made = record_input(record, Recipe.of_dataset(dataset, max_chars=50))
    text = render(record, RenderConfig("tagged", None, "find the product"), ["brand", "title"], 50)
    assert made.item == EncoderInput("find the product", text) and len(text) == 50
    assert made.input_hash == input_hash("find the product", text)
    whole = record_input(record, Recipe.of_dataset(dataset))
    assert whole.text.startswith(text) and len(whole.text) > 50


def test_render_options_given_then_trained_folder_then_default(tmp_path):
    write_manifest(tmp_path, {"encoder": {}, "render": {"serialization": "plain", "instruction": "match it"}})
    assert render_options(tmp_path, None, None) == ("plain", "match it")
    assert render_options(tmp_path, "tagged", "") == ("tagged", "")
    assert render_options("minilm", None, None) == ("tagged", None)
