"""Stored vectors: the content cache shared by the worker (writes) and the API (reads), and each dataset's own
cache of explanation vectors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from llmatch.models import Embedding, ExplanationVector, Record


def to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def from_bytes(blob: bytes, dim: int) -> np.ndarray:
    vector = np.frombuffer(blob, dtype="<f4")
    if vector.shape != (dim,):
        raise ValueError(f"stored vector has {vector.size} values, expected {dim}")
    return vector.astype(np.float32)


def stack(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    """Decode many stored vectors into one ``(n, dim)`` float32 array."""
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim).astype(np.float32)


def find_embeddings(session: Session, encoder_key: str, input_hashes: Iterable[str]) -> dict[str, int]:
    """Embedding ids already stored for these inputs, by input hash."""
    wanted = sorted(set(input_hashes))
    found: dict[str, int] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        rows = session.execute(
            select(Embedding.input_hash, Embedding.id).where(
                Embedding.encoder_key == encoder_key, Embedding.input_hash.in_(chunk)
            )
        )
        found.update({input_hash: embedding_id for input_hash, embedding_id in rows})
    return found


def load_vectors(session: Session, encoder_key: str, input_hashes: Iterable[str]) -> dict[str, np.ndarray]:
    """Stored vectors for these inputs, by input hash (missing inputs are absent)."""
    wanted = sorted(set(input_hashes))
    found: dict[str, np.ndarray] = {}
    for start in range(0, len(wanted), 500):
        rows = session.execute(
            select(Embedding.input_hash, Embedding.vector, Embedding.dim).where(
                Embedding.encoder_key == encoder_key, Embedding.input_hash.in_(wanted[start : start + 500])
            )
        )
        found.update({input_hash: from_bytes(blob, dim) for input_hash, blob, dim in rows})
    return found


def store_embeddings(session: Session, encoder_key: str, vectors: dict[str, np.ndarray]) -> dict[str, int]:
    """Store new vectors (skipping inputs another worker stored first) and return all their ids."""
    existing = find_embeddings(session, encoder_key, vectors)
    new = [
        Embedding(encoder_key=encoder_key, input_hash=h, dim=int(v.shape[0]), vector=to_bytes(v))
        for h, v in vectors.items()
        if h not in existing
    ]
    session.add_all(new)
    session.flush()
    existing.update({embedding.input_hash: embedding.id for embedding in new})
    return existing


def delete_orphaned_embeddings(session: Session, embedding_ids: Iterable[int]) -> int:
    """Delete those of these embeddings that no record references any more."""
    ids = sorted({i for i in embedding_ids if i is not None})
    deleted = 0
    for start in range(0, len(ids), 500):
        referenced = exists().where(Record.embedding_id == Embedding.id)
        result = session.execute(delete(Embedding).where(Embedding.id.in_(ids[start : start + 500]), ~referenced))
        deleted += result.rowcount or 0
    return deleted


def load_explanation_vectors(
    session: Session, dataset_id: int, encoder_key: str, input_hashes: Iterable[str]
) -> dict[str, np.ndarray]:
    """The dataset's cached explanation vectors for these inputs, by input hash (missing inputs are absent)."""
    wanted = sorted(set(input_hashes))
    found: dict[str, np.ndarray] = {}
    for start in range(0, len(wanted), 500):
        rows = session.execute(
            select(ExplanationVector.input_hash, ExplanationVector.vector, ExplanationVector.dim).where(
                ExplanationVector.dataset_id == dataset_id,
                ExplanationVector.encoder_key == encoder_key,
                ExplanationVector.input_hash.in_(wanted[start : start + 500]),
            )
        )
        found.update({input_hash: from_bytes(blob, dim) for input_hash, blob, dim in rows})
    return found


def store_explanation_vectors(
    session: Session, dataset_id: int, encoder_key: str, vectors: dict[str, np.ndarray], keep: int
) -> None:
    """Cache new explanation vectors of the dataset (skipping those stored meanwhile), then keep its newest ``keep``."""
    stored = load_explanation_vectors(session, dataset_id, encoder_key, vectors)
    session.add_all(
        ExplanationVector(
            dataset_id=dataset_id, encoder_key=encoder_key, input_hash=h, dim=int(v.shape[0]), vector=to_bytes(v)
        )
        for h, v in vectors.items()
        if h not in stored
    )
    session.flush()
    purge_explanation_vectors(session, dataset_id, keep)


def delete_explanation_vectors(session: Session, dataset_id: int) -> int:
    """Delete every explanation vector of the dataset; returns how many were deleted."""
    result = session.execute(delete(ExplanationVector).where(ExplanationVector.dataset_id == dataset_id))
    return result.rowcount or 0


def purge_explanation_vectors(session: Session, dataset_id: int, keep: int) -> int:
    """Delete the dataset's explanation vectors but the newest ``keep``; returns how many were deleted."""
    newest_dropped = session.scalar(
        select(ExplanationVector.id)
        .where(ExplanationVector.dataset_id == dataset_id)
        .order_by(ExplanationVector.id.desc())
        .offset(keep)
        .limit(1)
    )
    if newest_dropped is None:
        return 0
    result = session.execute(
        delete(ExplanationVector).where(
            ExplanationVector.dataset_id == dataset_id, ExplanationVector.id <= newest_dropped
        )
    )
    return result.rowcount or 0
