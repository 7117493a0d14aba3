"""The recipe: how a record becomes what its dataset's encoder embeds, and the hash that names it.

``record_input`` is the one place this happens: the worker (claimed records), the API (inline records, record
views, explanations), training and evaluation all call it, so one record gives one text and one hash
everywhere. ``render_options`` chooses what a dataset is rendered with: as given, else as the trained folder
named as its encoder recorded, else tagged with no instruction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from encoding.encoder import EncoderInput
from encoding.manifest import is_trained_folder, read_manifest
from encoding.render import RenderConfig, input_hash, render


class DatasetRendering(Protocol):
    """What a stored dataset says about its text (``llmatch.models.Dataset`` has these columns)."""

    serialization: str
    attributes: Sequence[str] | None
    instruction: str | None
    seen_attributes: Sequence[str] | None


@dataclass(frozen=True)
class Recipe:
    """What decides a record's encoder input: the rendering, the order attributes were first seen in (used
    when the rendering fixes no attribute list) and the encoder's cut in characters (None: uncut)."""

    config: RenderConfig = RenderConfig()
    seen_order: Sequence[str] = ()
    max_chars: int | None = None

    @classmethod
    def of_dataset(cls, dataset: DatasetRendering, max_chars: int | None = None) -> Recipe:
        """A stored dataset's recipe; ``max_chars`` is the encoder pool's cut (``LLMATCH_MAX_TEXT_CHARS``), which
        the worker applies before hashing, so the API must too wherever it looks a text up or encodes it."""
        config = RenderConfig(dataset.serialization, dataset.attributes, dataset.instruction)
        return cls(config, dataset.seen_attributes or (), max_chars)


@dataclass(frozen=True)
class RecordInput:
    """What an encoder embeds for a record, and its identity in the content cache (hashed when first asked)."""

    item: EncoderInput

    @cached_property
    def input_hash(self) -> str:
        return input_hash(self.item.instruction, self.item.text)

    @property
    def text(self) -> str:
        return self.item.text

    @property
    def instruction(self) -> str | None:
        return self.item.instruction


def record_input(attributes: Mapping[str, Any], recipe: Recipe) -> RecordInput:
    """A record's encoder input by ``recipe``: its attributes rendered (cut to ``recipe.max_chars``), with the
    dataset's instruction, and the hash of exactly that."""
    text = render(attributes, recipe.config, recipe.seen_order, recipe.max_chars)
    return RecordInput(EncoderInput(recipe.config.instruction, text))


def render_options(
    encoder: str | Path | None, serialization: str | None, instruction: str | None
) -> tuple[str, str | None]:
    """Serialization and instruction: as given, else as the trained folder ``encoder`` recorded, else tagged
    and none (a folder from ``llmatch train`` embeds records the way it was trained on them)."""
    render = read_manifest(encoder).get("render", {}) if encoder and is_trained_folder(encoder) else {}
    return (
        serialization or render.get("serialization") or "tagged",
        instruction if instruction is not None else render.get("instruction"),
    )
