"""The storage schema (SQLAlchemy 2.0 typed ORM). Every change goes through an Alembic migration."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# SQLite only auto-increments INTEGER PRIMARY KEY columns; PostgreSQL gets BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")

PENDING, ENCODED, FAILED = "pending", "encoded", "failed"
RECORD_STATUSES = (PENDING, ENCODED, FAILED)


class Base(DeclarativeBase):
    pass


class Dataset(Base):
    """One matching problem with its own encoder, serialization and calibration."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    encoder: Mapped[str] = mapped_column(String(128))
    serialization: Mapped[str] = mapped_column(String(16), default="tagged")
    attributes: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    instruction: Mapped[str | None] = mapped_column(Text, nullable=True)
    seen_attributes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now(), onupdate=func.now())

    calibration: Mapped[Calibration | None] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True, uselist=False
    )


class Embedding(Base):
    """One vector per (encoder, embedded input): the content cache that keeps texts from being re-encoded."""

    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("encoder_key", "input_hash", name="uq_embeddings_encoder_input"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    encoder_key: Mapped[str] = mapped_column(String(64))
    input_hash: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, L2-normalised, little-endian
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class Record(Base):
    """A stored record and where it stands in the encoding queue."""

    __tablename__ = "records"
    __table_args__ = (
        UniqueConstraint("dataset_id", "source", "external_id", name="uq_records_dataset_source_id"),
        Index("ix_records_queue", "status", "lease_until"),
        Index("ix_records_dataset_source_status", "dataset_id", "source", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(String(64))
    external_id: Mapped[str] = mapped_column(String(256))
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON)
    content_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    embedding_id: Mapped[int | None] = mapped_column(
        ForeignKey("embeddings.id", ondelete="RESTRICT"), nullable=True, index=True
    )
    claim_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now(), onupdate=func.now())
    encoded_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    embedding: Mapped[Embedding | None] = relationship()


class IndexChange(Base):
    """Append-only log of what entered or left a (dataset, source) index, read by API processes to
    keep their in-memory FAISS indexes current. ``embedding_id`` is null for a removal."""

    __tablename__ = "index_changes"
    __table_args__ = (Index("ix_index_changes_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(64))
    record_id: Mapped[int] = mapped_column(BigInteger)
    embedding_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class Calibration(Base):
    """A dataset's active decision threshold and score-to-probability mapping."""

    __tablename__ = "calibrations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), unique=True)
    encoder_key: Mapped[str] = mapped_column(String(64))
    objective: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float] = mapped_column(Float)
    precision: Mapped[float] = mapped_column(Float)
    recall: Mapped[float] = mapped_column(Float)
    f1: Mapped[float] = mapped_column(Float)
    pairs: Mapped[int] = mapped_column(Integer)
    positives: Mapped[int] = mapped_column(Integer)
    probability_model: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())

    dataset: Mapped[Dataset] = relationship(back_populates="calibration")
