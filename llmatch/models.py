"""The storage schema (SQLAlchemy 2.0 typed ORM). Every change goes through an Alembic migration."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    FetchedValue,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.ext.hybrid import hybrid_property
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
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    encoder: Mapped[str] = mapped_column(String(128))
    serialization: Mapped[str] = mapped_column(String(16), default="tagged")
    attributes: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    instruction: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The trained version of the encoder that serves the dataset (``EncoderVersion.name``); None: ``encoder`` as
    # it came. Set when a training job's version is adopted; cleared when the configuration changes the text.
    encoder_version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    seen_attributes: Mapped[list[str]] = mapped_column(JSON, default=list)
    # The dataset's own FAISS index policy (fields of matching.index.IndexPolicy); None: the process's settings.
    index_options: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now(), onupdate=func.now())

    calibration: Mapped[Calibration | None] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True, uselist=False
    )

    @hybrid_property
    def serving_encoder(self) -> str:
        """The encoder name records and queries are embedded with: the adopted version, else ``encoder`` (in
        Python on a row, and as a SQL expression on the class)."""
        return self.encoder_version or self.encoder

    @serving_encoder.inplace.expression
    @classmethod
    def _serving_encoder_expression(cls) -> ColumnElement[str]:
        return func.coalesce(cls.encoder_version, cls.encoder)


class Embedding(Base):
    """One vector per (encoder, embedded input): the content cache that keeps texts from being re-encoded."""

    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("encoder_key", "input_hash", name="uq_embeddings_encoder_input"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    encoder_key: Mapped[str] = mapped_column(String(64))
    input_hash: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, L2-normalised, little-endian
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class ExplanationVector(Base):
    """An attribute value embedded alone for one dataset's explanations: that dataset's own cache (no dataset can
    tell what another explained), deleted with it and kept to a bounded number of rows (the oldest go first)."""

    __tablename__ = "explanation_vectors"
    __table_args__ = (
        UniqueConstraint("dataset_id", "encoder_key", "input_hash", name="uq_explanation_vectors_dataset_input"),
        Index("ix_explanation_vectors_dataset_id", "dataset_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
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
        {"sqlite_autoincrement": True},
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
    # While a worker encodes the record: how many texts share its encoder call. A lease that runs out with this
    # set means the worker died encoding: alone, the record is blamed (an attempt); in a group of n, it is encoded
    # next in groups of at most n/4 (``batch_limit``), so a record that kills workers is cornered in a few deaths
    # and cannot take others with it, while a random kill seldom finds an innocent record alone.
    inflight_batch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    batch_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now(), onupdate=func.now())
    encoded_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    embedding: Mapped[Embedding | None] = relationship()


class IndexChange(Base):
    """Append-only log of what entered or left a (dataset, source) index, read by API processes to
    keep their in-memory FAISS indexes current. ``embedding_id`` is null for a removal."""

    __tablename__ = "index_changes"
    __table_args__ = (
        Index("ix_index_changes_created_at", "created_at"),
        Index("ix_index_changes_txid", "txid"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(64))
    record_id: Mapped[int] = mapped_column(BigInteger)
    embedding_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # PostgreSQL: the writing transaction's id (set by the database); null on SQLite, where writes serialise.
    txid: Mapped[int | None] = mapped_column(BigInteger, nullable=True, server_default=FetchedValue())
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class ChangeLogPruned(Base):
    """One row: the highest change-log id (and PostgreSQL transaction id) pruning has removed, so a follower
    that had not read that far knows it must reload instead of applying what is left."""

    __tablename__ = "change_log_pruned"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    max_id: Mapped[int] = mapped_column(BigInteger)
    max_txid: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Calibration(Base):
    """A dataset's active decision threshold and score-to-probability mapping."""

    __tablename__ = "calibrations"
    __table_args__ = {"sqlite_autoincrement": True}

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


class ApiKey(Base):
    """An API key: only the SHA-256 of the key is stored; scopes are ``admin`` or ``DATASET:read|write|manage``."""

    __tablename__ = "api_keys"
    __table_args__ = (
        UniqueConstraint("name", name="uq_api_keys_name"),
        UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    key_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class AuditEvent(Base):
    """Who (a key's name, or ``local`` while auth is off) changed what: configuration, deletions,
    calibrations and key operations."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(256))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Label(Base):
    """A person's verdict on a pair of records, kept in one order (the lesser (source, id) on the left)."""

    __tablename__ = "labels"
    __table_args__ = (
        UniqueConstraint("dataset_id", "left_source", "left_id", "right_source", "right_id", name="uq_labels_pair"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    left_source: Mapped[str] = mapped_column(String(64))
    left_id: Mapped[str] = mapped_column(String(256))
    right_source: Mapped[str] = mapped_column(String(64))
    right_id: Mapped[str] = mapped_column(String(256))
    label: Mapped[int] = mapped_column(Integer)
    # The label's fold for training jobs, fixed the first time a job reads it: True, held out (no version ever
    # trains on it; selection, calibration and adoption are judged on it); False, trained on; None, not yet read.
    holdout: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now(), onupdate=func.now())


class EntityState(Base):
    """Per dataset: the calibration its entities were built with; its row is the lock entity updates take."""

    __tablename__ = "entity_states"

    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    calibration_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now(), onupdate=func.now())


class Entity(Base):
    """A group of records linked by accepted matches; ids only grow, so a smaller id is an older entity."""

    __tablename__ = "entities"
    __table_args__ = (Index("ix_entities_dataset_size", "dataset_id", "size"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class EntityMember(Base):
    """Which entity an encoded record belongs to, and the vector it was grouped with."""

    __tablename__ = "entity_members"
    __table_args__ = (
        Index("ix_entity_members_entity", "entity_id"),
        Index("ix_entity_members_dataset", "dataset_id"),
    )

    record_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    entity_id: Mapped[int] = mapped_column(ForeignKey("entities.id", ondelete="CASCADE"))
    embedding_id: Mapped[int] = mapped_column(BigInteger)


class EntityLink(Base):
    """An accepted match among a record's candidates (score >= threshold); ``left_record_id`` < ``right_record_id``."""

    __tablename__ = "entity_links"
    __table_args__ = (
        UniqueConstraint("left_record_id", "right_record_id", name="uq_entity_links_pair"),
        Index("ix_entity_links_right", "right_record_id"),
        Index("ix_entity_links_dataset", "dataset_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    left_record_id: Mapped[int] = mapped_column(BigInteger)
    right_record_id: Mapped[int] = mapped_column(BigInteger)
    score: Mapped[float] = mapped_column(Float)


QUEUED, TRAINING, ENCODING = "queued", "training", "encoding"
DONE, JOB_FAILED, CANCELLED = "done", "failed", "cancelled"
UNFINISHED_JOB_STATUSES = (QUEUED, TRAINING, ENCODING)
JOB_STATUSES = (*UNFINISHED_JOB_STATUSES, DONE, JOB_FAILED, CANCELLED)


class TrainingJob(Base):
    """A request to train a new version of a dataset's encoder from its stored labels, run by an encoder worker
    under a lease (a worker that dies leaves the lease to run out; the job is then run again or failed)."""

    __tablename__ = "training_jobs"
    __table_args__ = (
        Index("ix_training_jobs_dataset_created", "dataset_id", "created_at"),
        Index("ix_training_jobs_queue", "status", "lease_until"),
        # One unfinished job per dataset, whoever races to start one.
        Index(
            "uq_training_jobs_one_unfinished",
            "dataset_id",
            unique=True,
            sqlite_where=text("status IN ('queued', 'training', 'encoding')"),
            postgresql_where=text("status IN ('queued', 'training', 'encoding')"),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    labels: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    adopted: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claim_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now(), onupdate=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class EncoderVersion(Base):
    """A version of a dataset's encoder trained by a job: a folder under the data directory, and this row."""

    __tablename__ = "encoder_versions"
    __table_args__ = (
        UniqueConstraint("name", name="uq_encoder_versions_name"),
        Index("ix_encoder_versions_dataset", "dataset_id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    base_encoder: Mapped[str] = mapped_column(String(128))
    encoder_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    job_id: Mapped[str] = mapped_column(String(32))
    # trained (being judged or encoded), serving, retired (replaced by a later one), rejected (not adopted)
    status: Mapped[str] = mapped_column(String(16), default="trained")
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
