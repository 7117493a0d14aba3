"""Vectors for the scale benchmarks: synthetic embeddings, and a bulk writer that stores them as encoded records
straight into the database (no encoder involved, so the encoder is not the clock)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, func, insert, select, text
from sqlalchemy.orm import Session

from llmatch.models import ENCODED, Dataset, Embedding, Record


@dataclass(frozen=True)
class Space:
    """A synthetic embedding distribution: unit vectors around cluster centres in a low-dimensional subspace,
    plus isotropic noise (sentence embeddings have a low intrinsic dimension and topical clusters)."""

    dim: int = 384
    latent: int = 64
    clusters: int = 20_000
    spread: float = 0.6
    noise: float = 0.25
    seed: int = 0

    def sample(self, n: int, seed: int, chunk: int = 100_000) -> Iterator[np.ndarray]:
        """``n`` unit vectors (float32), ``chunk`` rows at a time; the same ``seed`` gives the same vectors."""
        space = np.random.default_rng(self.seed)
        basis = np.linalg.qr(space.normal(size=(self.dim, self.latent)))[0].astype(np.float32)
        centres = space.normal(size=(self.clusters, self.latent)).astype(np.float32)
        rng = np.random.default_rng(seed)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            z = centres[rng.integers(self.clusters, size=m)] + self.spread * rng.standard_normal(
                (m, self.latent), dtype=np.float32
            )
            x = z @ basis.T + self.noise * rng.standard_normal((m, self.dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            yield x

    def array(self, n: int, seed: int) -> np.ndarray:
        return np.concatenate(list(self.sample(n, seed))) if n else np.zeros((0, self.dim), np.float32)


SYNTHETIC_ENCODER = "synthetic"  # vectors made by no configured encoder: the service's encoder-key check skips them


def ensure_dataset(session: Session, name: str, encoder: str = SYNTHETIC_ENCODER) -> int:
    dataset = session.scalar(select(Dataset).where(Dataset.name == name))
    if dataset is None:
        dataset = Dataset(name=name, encoder=encoder)
        session.add(dataset)
        session.flush()
    return dataset.id


def store_vectors(
    engine: Engine, dataset: str, source: str, vectors: Iterator[np.ndarray], encoder_key: str = "bench"
) -> int:
    """Store each vector as an embedding and an encoded record ``{source}-{n}`` of ``dataset``; returns the count."""
    stored = 0
    with Session(engine) as session, session.begin():
        dataset_id = ensure_dataset(session, dataset)
        next_embedding = (session.scalar(select(func.max(Embedding.id))) or 0) + 1
        next_record = (session.scalar(select(func.max(Record.id))) or 0) + 1
    for block in vectors:
        for start in range(0, len(block), 20_000):
            part = block[start : start + 20_000]
            n = len(part)
            embedding_ids = range(next_embedding, next_embedding + n)
            record_ids = range(next_record, next_record + n)
            labels = [f"{source}-{stored + i}" for i in range(n)]
            hashes = [hashlib.sha256(f"{dataset}/{label}".encode()).hexdigest() for label in labels]
            with Session(engine) as session, session.begin():
                session.execute(
                    insert(Embedding),
                    [
                        {"id": i, "encoder_key": encoder_key, "input_hash": h, "dim": part.shape[1], "vector": v}
                        for i, h, v in zip(embedding_ids, hashes, _blobs(part), strict=True)
                    ],
                )
                session.execute(
                    insert(Record),
                    [
                        {
                            "id": r,
                            "dataset_id": dataset_id,
                            "source": source,
                            "external_id": label,
                            "attributes": {"name": label},
                            "content_hash": h,
                            "status": ENCODED,
                            "embedding_id": e,
                        }
                        for r, e, label, h in zip(record_ids, embedding_ids, labels, hashes, strict=True)
                    ],
                )
            next_embedding += n
            next_record += n
            stored += n
    if engine.dialect.name == "postgresql":  # explicit ids bypass the sequences: move them past what was written
        with engine.begin() as connection:
            for table in ("embeddings", "records"):
                connection.execute(
                    text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), MAX(id)) FROM {table}")
                )
    return stored


def _blobs(vectors: np.ndarray) -> list[bytes]:
    raw = np.ascontiguousarray(vectors, dtype="<f4")
    return [row.tobytes() for row in raw]


def real_vectors(cache: Path) -> np.ndarray:
    """MiniLM vectors of every record of the shared benchmark tables (about 52,000), cached in ``cache``."""
    if cache.exists():
        return np.load(cache)
    from bench import common

    texts: list[str] = []
    for table in sorted(common.DATASETS_DIR.glob("*/table*.csv")):
        texts.extend(common.rendered_texts(common.read_table(table)))
    pool = common.load_encoder_pool()
    vectors = np.concatenate(
        [pool.encode(common.ENCODER, common.encoder_inputs(texts[i : i + 1000])) for i in range(0, len(texts), 1000)]
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors
