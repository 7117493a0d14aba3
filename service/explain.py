"""Why two records score as they do: each attribute's values embedded alone and compared, and the model or
part numbers the two records share or do not."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from encoder_worker.encoders.base import EncoderInput
from encoder_worker.encoders.identifiers import identifier_tokens
from encoder_worker.encoders.registry import EncoderPool
from encoder_worker.render import RenderConfig, input_hash, render, render_config, value_text
from llmatch.db import transaction
from llmatch.models import Dataset
from llmatch.vectors import load_vectors, store_embeddings
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


def explain(
    session_factory: sessionmaker[Session],
    pool: EncoderPool,
    dataset: Dataset,
    left: Mapping[str, Any],
    right: Mapping[str, Any],
) -> Explanation:
    """Compare two records attribute by attribute (values embedded alone, through the content cache)."""
    config = render_config(dataset)
    names = _attribute_names(config, dataset.seen_attributes, left, right)
    texts = {name: (_value(left.get(name)), _value(right.get(name))) for name in names}
    alone = {value_input(config, name, v) for name, pair in texts.items() for v in pair if v is not None}
    vectors = _vectors(session_factory, pool, dataset.encoder, alone)
    attributes = []
    for name, (left_text, right_text) in texts.items():
        similarity = None
        if left_text is not None and right_text is not None:
            a = vectors[value_input(config, name, left_text)]
            b = vectors[value_input(config, name, right_text)]
            similarity = float(np.clip(np.dot(a, b), -1.0, 1.0))
        attributes.append(AttributeComparison(name=name, left=left_text, right=right_text, similarity=similarity))
    return Explanation(attributes=attributes, identifiers=compare_identifiers(left, right, names))


def compare_identifiers(left: Mapping[str, Any], right: Mapping[str, Any], names: list[str]) -> IdentifierComparison:
    """Model and part numbers (as identifier features read them) found in both records, or in one only."""
    left_tokens = identifier_tokens(" ".join(value_text(left.get(name)) for name in names))
    right_tokens = identifier_tokens(" ".join(value_text(right.get(name)) for name in names))
    return IdentifierComparison(
        shared=sorted(left_tokens & right_tokens),
        left_only=sorted(left_tokens - right_tokens),
        right_only=sorted(right_tokens - left_tokens),
    )


def value_input(config: RenderConfig, name: str, text: str) -> EncoderInput:
    """What is embedded for one attribute value: a record of that attribute alone, rendered as the dataset does."""
    alone = RenderConfig(config.serialization, None, config.instruction)
    return EncoderInput(config.instruction, render({name: text}, alone, [name]))


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
    session_factory: sessionmaker[Session], pool: EncoderPool, encoder: str, inputs: set[EncoderInput]
) -> dict[EncoderInput, np.ndarray]:
    """Vectors of these inputs: from the content cache, encoding (and caching) only what it lacks."""
    if not inputs:
        return {}
    key = pool.spec(encoder).key
    by_hash = {input_hash(item.instruction, item.text): item for item in inputs}
    with session_factory() as session:
        found = load_vectors(session, key, by_hash)
    missing = [h for h in by_hash if h not in found]
    if missing:
        encoded = pool.encode(encoder, [by_hash[h] for h in missing])
        fresh = {h: encoded[i] for i, h in enumerate(missing)}
        found.update(fresh)
        try:
            with transaction(session_factory) as session:
                store_embeddings(session, key, fresh)
        except IntegrityError:  # another request cached the same values first: theirs are identical
            log.debug("attribute vectors cached concurrently")
    return {item: found[h] for h, item in by_hash.items()}
