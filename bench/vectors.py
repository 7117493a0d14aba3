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
    plus isotropic noise (sentence embeddings have a low intrinsic dimension and topical clusters).

    The last four fields make it less regular than k-means lists: cluster ``i`` is drawn with weight
    ``(i + 1) ** -size_power`` (0: all alike), its spread is ``spread`` times a factor log-uniform in
    ``[1 / spread_range, spread_range]`` (1: all alike), and a ``duplicates`` share of rows are near-copies of
    another row of the same chunk (``duplicate_noise`` added per coordinate), as matching records are. Their
    defaults leave the distribution, and the vectors a seed gives, as they were."""

    dim: int = 384
    latent: int = 64
    clusters: int = 20_000
    spread: float = 0.6
    noise: float = 0.25
    seed: int = 0
    size_power: float = 0.0
    spread_range: float = 1.0
    duplicates: float = 0.0
    duplicate_noise: float = 0.1

    def sample(self, n: int, seed: int, chunk: int = 100_000) -> Iterator[np.ndarray]:
        """``n`` unit vectors (float32), ``chunk`` rows at a time; the same ``seed`` gives the same vectors."""
        space = np.random.default_rng(self.seed)
        basis = np.linalg.qr(space.normal(size=(self.dim, self.latent)))[0].astype(np.float32)
        centres = space.normal(size=(self.clusters, self.latent)).astype(np.float32)
        spreads = self._spreads(space)
        rng = np.random.default_rng(seed)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            members = self._members(rng, m)
            z = centres[members] + spreads[members, None] * rng.standard_normal((m, self.latent), dtype=np.float32)
            x = z @ basis.T + self.noise * rng.standard_normal((m, self.dim), dtype=np.float32)
            if self.duplicates:
                x = self._with_duplicates(rng, x)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            yield x

    def array(self, n: int, seed: int) -> np.ndarray:
        return np.concatenate(list(self.sample(n, seed))) if n else np.zeros((0, self.dim), np.float32)

    @classmethod
    def skewed(cls) -> Space:
        """Less regular than the k-means lists an inverted file trains: 30,000 clusters (far more than the
        ~sqrt(n) lists) whose sizes follow a power law, spreads varying 2x either way, one row in five a
        near-copy of another."""
        return cls(latent=48, clusters=30_000, spread=0.4, noise=0.15, size_power=1.0, spread_range=2.0,
                   duplicates=0.2, duplicate_noise=0.1)  # fmt: skip

    def weights(self) -> np.ndarray:
        """Each cluster's share of the rows."""
        weights = np.arange(1, self.clusters + 1, dtype=np.float64) ** -self.size_power
        return weights / weights.sum()

    def _spreads(self, space: np.random.Generator) -> np.ndarray:
        if self.spread_range == 1.0:
            return np.full(self.clusters, self.spread, dtype=np.float32)
        bound = np.log(self.spread_range)
        return (self.spread * np.exp(space.uniform(-bound, bound, size=self.clusters))).astype(np.float32)

    def _members(self, rng: np.random.Generator, m: int) -> np.ndarray:
        if self.size_power == 0.0:
            return rng.integers(self.clusters, size=m)
        return rng.choice(self.clusters, size=m, p=self.weights())

    def _with_duplicates(self, rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
        """``x`` with a ``duplicates`` share of its rows replaced by near-copies of other rows."""
        m = len(x)
        copies = np.flatnonzero(rng.random(m) < self.duplicates)
        sources = rng.integers(m, size=len(copies))
        x[copies] = x[sources] + self.duplicate_noise * rng.standard_normal((len(copies), self.dim), dtype=np.float32)
        return x


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
