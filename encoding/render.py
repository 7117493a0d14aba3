"""Turn a stored record into the text an encoder embeds (tagged or plain serialization)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SERIALIZATIONS = ("tagged", "plain")


@dataclass(frozen=True)
class RenderConfig:
    """What decides a dataset's embedded text."""

    serialization: str = "tagged"
    attributes: Sequence[str] | None = None  # fixed order and selection; None: the order first seen
    instruction: str | None = None


def value_text(value: Any) -> str:
    """A value as text: numbers in their shortest decimal form, null as empty."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e16 else repr(value)
    return str(value).strip()


def render(
    attributes: Mapping[str, Any], config: RenderConfig, seen_order: Sequence[str] = (), max_chars: int | None = None
) -> str:
    """Serialize a record: ``[name] value [\\name] ...`` (tagged) or the values alone (plain).

    Empty and null values are left out. Attributes outside ``config.attributes`` are dropped; without a
    fixed list, attributes follow ``seen_order`` and then their order in the record. With ``max_chars``, the
    text is cut there (as encoders cut it) and building stops once it is that long: the result is the full
    text's first ``max_chars`` characters, and the full text of a huge record is never held in memory.
    """
    names = list(config.attributes) if config.attributes is not None else _ordered(attributes, seen_order)
    parts: list[str] = []
    length = -1  # the separators: one fewer than the parts
    for name in names:
        text = value_text(attributes.get(name))
        if not text:
            continue
        parts.append(f"[{name}] {text} [\\{name}]" if config.serialization == "tagged" else text)
        length += len(parts[-1]) + 1
        if max_chars is not None and length >= max_chars:
            break
    rendered = " ".join(parts)
    return rendered if max_chars is None else rendered[:max_chars]


def _ordered(attributes: Mapping[str, Any], seen_order: Sequence[str]) -> list[str]:
    seen = [name for name in seen_order if name in attributes]
    return seen + [name for name in attributes if name not in set(seen)]


def content_hash(attributes: Mapping[str, Any]) -> str:
    """Identity of a record's content, independent of key order."""
    canonical = json.dumps(attributes, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def input_hash(instruction: str | None, text: str) -> str:
    """Identity of what an encoder embeds: the instruction and the rendered text."""
    payload = json.dumps([instruction or "", text], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()
