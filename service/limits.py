"""Bounds one client cannot break: concurrent on-the-spot encodes, distinct attribute names and sources per dataset.

The others live where they apply: the request body limit in ``service/app.py`` (``BodySizeLimit``), the cut
of rendered text before tokenisation in ``EncoderPool.encode``, ``k`` and the per-record maxima in
``service/schemas.py``. Every one is a setting in ``llmatch/settings.py`` and a row of the README's table.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from fastapi import HTTPException
from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from encoding.encoder import EncoderInput
from encoding.registry import EncoderPool
from llmatch.models import Dataset, Record
from service.errors import Unprocessable

RETRY_AFTER_SECONDS = 1


class InlineEncodes:
    """The encoder pool as the API uses it: every on-the-spot encode (inline records of POST /match and
    POST /candidates, explanations) takes one of ``limit`` slots, running or waiting for the encoder; with
    none free the request gets 429 and ``Retry-After`` instead of queueing without bound. Everything else is
    the wrapped pool's."""

    def __init__(self, pool: EncoderPool, limit: int):
        self.inner = pool
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, name: str, inputs: Sequence[EncoderInput]) -> np.ndarray:
        if not self._slots.acquire(blocking=False):
            raise HTTPException(
                status_code=429,
                detail=f"The server is already encoding {self.limit} records on the spot "
                "(LLMATCH_MAX_INLINE_ENCODES); retry after a second, or store records with POST /records "
                "and query them by id.",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        try:
            return self.inner.encode(name, inputs)
        finally:
            self._slots.release()


def check_attribute_names(dataset: Dataset, attribute_maps: Iterable[Mapping[str, Any]], limit: int) -> None:
    """422 when these records would bring the dataset past ``limit`` distinct attribute names."""
    known = set(dataset.seen_attributes or [])
    new = {name for attributes in attribute_maps for name in attributes if name not in known}
    total = len(known) + len(new)
    if new and total > limit:
        raise Unprocessable(
            f"These records would give dataset {dataset.name!r} {total} distinct attribute names; the limit is "
            f"{limit} (LLMATCH_MAX_DATASET_ATTRIBUTES): reuse its attribute names, or put different kinds of "
            "records in different datasets."
        )


def check_label_count(dataset: Dataset, stored: int, new: int, limit: int) -> None:
    """422 when ``new`` labels of pairs not labelled yet would bring the dataset past ``limit`` labels."""
    if stored + new > limit:
        raise Unprocessable(
            f"Dataset {dataset.name!r} holds {stored} labels and this request adds {new}; the limit is {limit} "
            "(LLMATCH_MAX_DATASET_LABELS). Relabelling a pair does not count; DELETE the labels you no longer need, "
            "or raise the limit."
        )


def check_source_count(session: Session, dataset: Dataset, source: str, limit: int) -> None:
    """422 when records of a new ``source`` would bring the dataset past ``limit`` sources (each one is searched
    by every candidates query)."""
    known = select(Record.id).where(Record.dataset_id == dataset.id, Record.source == source).limit(1)
    if session.scalar(known) is not None:
        return
    count = session.scalar(select(func.count(distinct(Record.source))).where(Record.dataset_id == dataset.id)) or 0
    if count >= limit:
        raise Unprocessable(
            f"Dataset {dataset.name!r} already has {count} sources and the limit is {limit} "
            f"(LLMATCH_MAX_DATASET_SOURCES), so source {source!r} cannot be added: store these records under one "
            "of its sources, or in another dataset."
        )
