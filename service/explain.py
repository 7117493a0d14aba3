"""Why two records score as they do: each attribute's values embedded alone and compared, and the model or
part numbers the two records share or do not."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from encoding.encoder import EncoderInput
from encoding.identifiers import identifier_tokens
from encoding.recipe import Recipe, record_input
from encoding.registry import EncoderPool
from encoding.render import RenderConfig, input_hash, value_text
from llmatch.db import transaction
from llmatch.models import Dataset
from llmatch.settings import Settings
from llmatch.vectors import load_explanation_vectors, store_explanation_vectors
from service.records import get_record
from service.schemas import (
    AttributeComparison,
    Explanation,
    IdentifierComparison,
    InlineRecord,
    RecordRef,
)

log = logging.getLogger("llmatch.api")


def attributes_of(session: Session, dataset: Dataset, item: RecordRef | InlineRecord) -> dict[str, Any]:
    """The attributes of a stored record (404 when unknown) or of an inline one."""
    if isinstance(item, RecordRef):
        return dict(get_record(session, dataset, item.source, item.id).attributes)
    return dict(item.attributes)


@dataclass(frozen=True)
class ExplanationLimits:
    """The work one explanation may do: each value cut to ``value_chars`` first, then at most ``values`` distinct
    values and ``chars`` characters embedded, and ``chars`` characters of each record scanned for identifiers;
    and the vectors a dataset's explanation cache keeps (``cached``)."""

    value_chars: int
    values: int
    chars: int
    cached: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ExplanationLimits:
        return cls(
            settings.max_text_chars,
            settings.explain_max_values,
            settings.explain_max_chars,
            settings.explanation_cache_rows,
        )


def explain(
    session_factory: sessionmaker[Session],
    pool: EncoderPool,
    dataset: Dataset,
    left: Mapping[str, Any],
    right: Mapping[str, Any],
    limits: ExplanationLimits,
) -> Explanation:
    """Compare two records attribute by attribute (values embedded alone, through the dataset's explanation
    cache); attributes
    past the limits, like those with a value on one side only, get no similarity."""
    config = Recipe.of_dataset(dataset).config
    names = _attribute_names(config, dataset.seen_attributes, left, right)
    texts = {name: (_value(left.get(name)), _value(right.get(name))) for name in names}
    cut = {name: (_cut(a, limits.value_chars), _cut(b, limits.value_chars)) for name, (a, b) in texts.items()}
    compared = _compared_inputs(config, cut, limits)
    inputs = {item for pair in compared.values() for item in pair}
    vectors = _vectors(session_factory, pool, dataset, inputs, limits.cached)
    attributes = []
    for name, (left_text, right_text) in texts.items():
        similarity = None
        if name in compared:
            a, b = (vectors[item] for item in compared[name])
            similarity = float(np.clip(np.dot(a, b), -1.0, 1.0))
        attributes.append(AttributeComparison(name=name, left=left_text, right=right_text, similarity=similarity))
    sides = ([pair[0] for pair in cut.values()], [pair[1] for pair in cut.values()])
    return Explanation(attributes=attributes, identifiers=compare_identifiers(*sides, limits.chars))


def compare_identifiers(left: Iterable[str | None], right: Iterable[str | None], chars: int) -> IdentifierComparison:
    """Model and part numbers (as identifier features read them) found in both records, or in one only; each
    record's values are read in order while they fit in ``chars`` characters."""
    left_tokens = identifier_tokens(_joined(left, chars))
    right_tokens = identifier_tokens(_joined(right, chars))
    return IdentifierComparison(
        shared=sorted(left_tokens & right_tokens),
        left_only=sorted(left_tokens - right_tokens),
        right_only=sorted(right_tokens - left_tokens),
    )


def value_input(config: RenderConfig, name: str, text: str) -> EncoderInput:
    """What is embedded for one attribute value: a record of that attribute alone, rendered as the dataset does."""
    alone = RenderConfig(config.serialization, None, config.instruction)
    return record_input({name: text}, Recipe(alone, [name])).item


def _compared_inputs(
    config: RenderConfig, texts: Mapping[str, tuple[str | None, str | None]], limits: ExplanationLimits
) -> dict[str, tuple[EncoderInput, EncoderInput]]:
    """The attributes to compare with what each embeds: those with a value on both sides, in order, as long as
    the distinct inputs stay within the limits (an attribute that would pass them is left out)."""
    compared: dict[str, tuple[EncoderInput, EncoderInput]] = {}
    embedded: set[EncoderInput] = set()
    chars = 0
    for name, (left_text, right_text) in texts.items():
        if left_text is None or right_text is None:
            continue
        pair = (value_input(config, name, left_text), value_input(config, name, right_text))
        new = set(pair) - embedded
        cost = sum(len(item.text) for item in new)
        if len(embedded) + len(new) > limits.values or chars + cost > limits.chars:
            continue
        compared[name] = pair
        embedded |= new
        chars += cost
    return compared


def _cut(text: str | None, limit: int) -> str | None:
    """A value cut to the text limit, before any work on it."""
    return text if text is None or len(text) <= limit else text[:limit]


def _joined(values: Iterable[str | None], chars: int) -> str:
    """The values joined by spaces, in order, leaving out each one that would bring the text past ``chars``."""
    kept: list[str] = []
    total = 0
    for value in values:
        if value is not None and total + len(value) <= chars:
            kept.append(value)
            total += len(value) + 1
    return " ".join(kept)


def _attribute_names(
    config: RenderConfig, seen: list[str] | None, left: Mapping[str, Any], right: Mapping[str, Any]
) -> list[str]:
    """The dataset's fixed attributes, or the order first seen followed by any others the two records have."""
    if config.attributes is not None:
        return list(config.attributes)
    names = [name for name in (seen or []) if name in left or name in right]
    for record in (left, right):
        names += [name for name in record if name not in names]
    return names


def _value(value: Any) -> str | None:
    text = value_text(value)
    return text or None


def _vectors(
    session_factory: sessionmaker[Session], pool: EncoderPool, dataset: Dataset, inputs: set[EncoderInput], keep: int
) -> dict[EncoderInput, np.ndarray]:
    """Vectors of these inputs: from the dataset's explanation cache (never another dataset's, nor the records'
    content cache), encoding and caching only what it lacks; the cache keeps the dataset's newest ``keep``."""
    if not inputs:
        return {}
    key = pool.spec(dataset.serving_encoder).key
    by_hash = {input_hash(item.instruction, item.text): item for item in inputs}
    with session_factory() as session:
        found = load_explanation_vectors(session, dataset.id, key, by_hash)
    missing = [h for h in by_hash if h not in found]
    if missing:
        encoded = pool.encode(dataset.serving_encoder, [by_hash[h] for h in missing])
        fresh = {h: encoded[i] for i, h in enumerate(missing)}
        found.update(fresh)
        if keep > 0:
            _cache(session_factory, dataset.id, key, fresh, keep)
    return {item: found[h] for h, item in by_hash.items()}


def _cache(
    session_factory: sessionmaker[Session], dataset_id: int, key: str, vectors: dict[str, np.ndarray], keep: int
) -> None:
    """Store fresh vectors in the dataset's explanation cache (a failed write only costs a later encode)."""
    try:
        with transaction(session_factory) as session:
            store_explanation_vectors(session, dataset_id, key, vectors, keep)
    except IntegrityError:  # cached concurrently (the same vectors), or the dataset deleted meanwhile
        log.debug("attribute vectors cached concurrently, or the dataset was deleted meanwhile")
