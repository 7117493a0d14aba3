"""Encode every record of a dataset with a new encoder version into the content cache, without touching the
records: the current version keeps serving until the switch (``learning/switch.py``) moves them all at once."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from encoding.encoder import Encoder
from encoding.recipe import Recipe, record_input
from llmatch.db import transaction
from llmatch.models import Dataset, Record
from llmatch.vectors import find_embeddings, store_embeddings

PAGE = 512  # records read, looked up and encoded at a time


def encode_records(
    session_factory: sessionmaker[Session],
    dataset_id: int,
    encoder_key: str,
    encoder: Encoder,
    batch_size: int,
    max_chars: int,
    on_progress: Callable[[int, int], None],
) -> int:
    """Store a vector under ``encoder_key`` for every record of the dataset that lacks one (records added while
    this runs are taken in the same pass when their ids come later); returns how many texts were encoded."""
    encoded = 0
    last_id = 0
    with session_factory() as session:
        total = session.scalar(select(func.count()).select_from(Record).where(Record.dataset_id == dataset_id)) or 0
    done = 0
    while True:
        with session_factory() as session:
            dataset = session.get(Dataset, dataset_id)
            if dataset is None:
                return encoded
            recipe = Recipe.of_dataset(dataset, max_chars)
            rows = session.execute(
                select(Record.id, Record.attributes)
                .where(Record.dataset_id == dataset_id, Record.id > last_id)
                .order_by(Record.id)
                .limit(PAGE)
            ).all()
            if not rows:
                return encoded
            inputs = {made.input_hash: made.item for made in (record_input(attrs, recipe) for _, attrs in rows)}
            missing = [h for h in inputs if h not in find_embeddings(session, encoder_key, inputs)]
        if missing:
            vectors = encoder.encode([inputs[h] for h in missing], batch_size=batch_size)
            with transaction(session_factory) as session:
                store_embeddings(session, encoder_key, dict(zip(missing, vectors, strict=True)))
            encoded += len(missing)
        last_id = rows[-1][0]
        done += len(rows)
        on_progress(done, max(total, done))
