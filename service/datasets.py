"""Dataset configuration: create, update (re-queueing records whose text changes), describe, delete."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import delete, func, insert, null, select
from sqlalchemy.orm import Session

from encoding.registry import EncoderPool, EncoderUnavailableError, UnknownEncoderError
from learning.switch import retire_serving_version
from llmatch.models import RECORD_STATUSES, Calibration, Dataset, IndexChange, Record
from llmatch.requeue import requeue
from llmatch.vectors import delete_explanation_vectors, delete_orphaned_embeddings
from matching.index_policy import IndexPolicy
from service.errors import NotFound, Unprocessable
from service.schemas import CalibrationOut, DatasetConfigIn, DatasetOut, IndexOptionsOut, StatusCounts

TEXT_FIELDS = ("encoder", "serialization", "attributes", "instruction")
RENDER_FIELDS = ("serialization", "instruction")  # what a trained encoder folder records of how it was trained
NULLABLE = ("attributes", "instruction")

log = logging.getLogger("llmatch.api")


def get_dataset(session: Session, name: str, *, lock: bool = False) -> Dataset:
    """The dataset called ``name``; 404 with how to create it when there is none."""
    query = select(Dataset).where(Dataset.name == name)
    dataset = session.scalar(query.with_for_update() if lock else query)
    if dataset is None:
        raise unknown_dataset(name)
    return dataset


def unknown_dataset(name: str) -> NotFound:
    return NotFound(f"Unknown dataset {name!r}; create it with PUT /datasets/{name}.")


def check_encoder(pool: EncoderPool, name: str) -> None:
    try:
        spec = pool.spec(name)
    except UnknownEncoderError as error:
        message = str(error)
        raise Unprocessable(f"{message[:1].upper()}{message[1:]}.") from None
    if not spec.available:
        hint = " (run `llmatch fetch-smollm2`)" if name == "smollm2" else ""
        raise Unprocessable(
            f"Encoder {name!r} is configured but its model folder does not exist on the server{hint}."
        ) from EncoderUnavailableError(name)


def put_dataset(
    session: Session, pool: EncoderPool, name: str, body: DatasetConfigIn, default_encoder: str
) -> tuple[Dataset, bool]:
    """Create or update a dataset; returns (dataset, created). Text changes re-queue its records; index options
    change only how its vectors are indexed (see ``index_options``)."""
    # Fields sent are changed; null clears attributes and instruction, and keeps encoder and serialization.
    given = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None or k in NULLABLE}
    given.pop("index", None)
    if "index" in body.model_fields_set:
        given["index_options"] = index_options(body)
    if "encoder" in given:
        check_encoder(pool, given["encoder"])
    dataset = session.scalar(select(Dataset).where(Dataset.name == name).with_for_update())
    if dataset is None or given.get("encoder", dataset.encoder) != dataset.encoder:
        encoder = given.get("encoder", default_encoder)
        check_encoder(pool, encoder)
        given = as_trained(pool, name, encoder, given)
    if dataset is None:
        dataset = Dataset(
            name=name,
            encoder=encoder,
            serialization=given.get("serialization", "tagged"),
            attributes=given.get("attributes"),
            instruction=given.get("instruction"),
            index_options=given.get("index_options"),
            seen_attributes=[],
        )
        session.add(dataset)
        session.flush()
        return dataset, True
    changed = {field: value for field, value in given.items() if getattr(dataset, field) != value}
    for field, value in changed.items():
        setattr(dataset, field, value)
    if changed.keys() & set(TEXT_FIELDS):
        requeue_dataset(session, dataset)
        # A trained version learned the old text (and another encoder's weights): the configuration serves again.
        dataset.encoder_version = None
        retire_serving_version(session, dataset.id)
    session.flush()
    return dataset, False


def index_options(body: DatasetConfigIn) -> dict[str, object] | None:
    """The options to store from a body's ``index``: the fields given; None (the server's settings) for null or {}."""
    if body.index is None:
        return None
    return body.index.model_dump(exclude_none=True) or None


def effective_policy(dataset: Dataset, base: IndexPolicy) -> IndexPolicy:
    """The index policy in force for ``dataset``: its own options over the process's ``base`` policy."""
    return base.with_options(dataset.index_options)


def requeue_dataset(session: Session, dataset: Dataset) -> None:
    """Send every record of the dataset back to the queue and drop its now stale calibration."""
    requeue(session, Record.dataset_id == dataset.id)
    # Logged after the update so the log ends with the removal even if a worker encoded a record meanwhile.
    session.execute(
        insert(IndexChange).from_select(
            ["dataset_id", "source", "record_id", "embedding_id"],
            select(Record.dataset_id, Record.source, Record.id, null()).where(Record.dataset_id == dataset.id),
        )
    )
    session.execute(delete(Calibration).where(Calibration.dataset_id == dataset.id))
    session.expire(dataset, ["calibration"])


def delete_dataset(session: Session, name: str) -> int:
    """Delete a dataset with its records, its calibration, its explanation vectors and every vector its records
    held (those the change log names too: replaced or re-queued) that no record of another dataset holds;
    returns its id."""
    dataset = get_dataset(session, name, lock=True)
    embedding_ids = set(session.scalars(select(Record.embedding_id).where(Record.dataset_id == dataset.id)))
    logged = select(IndexChange.embedding_id).where(
        IndexChange.dataset_id == dataset.id, IndexChange.embedding_id.is_not(None)
    )
    embedding_ids.update(session.scalars(logged))
    session.execute(delete(Record).where(Record.dataset_id == dataset.id))
    session.execute(delete(Calibration).where(Calibration.dataset_id == dataset.id))
    delete_explanation_vectors(session, dataset.id)
    session.execute(delete(Dataset).where(Dataset.id == dataset.id))
    delete_orphaned_embeddings(session, embedding_ids)
    return dataset.id


def as_trained(pool: EncoderPool, name: str, encoder: str, given: dict[str, Any]) -> dict[str, Any]:
    """The fields given, with the serialization and instruction a trained encoder folder was trained with
    where the body leaves them out (records are served rendered as the encoder learned them); an explicit
    choice that differs is kept, and logged."""
    trained = pool.spec(encoder).trained_render
    if trained is None:
        return given
    chosen = dict(zip(RENDER_FIELDS, trained, strict=True)) | {k: v for k, v in given.items() if k in RENDER_FIELDS}
    if chosen != dict(zip(RENDER_FIELDS, trained, strict=True)):
        log.warning("dataset %r: %s", name, render_mismatch(encoder, trained, chosen))
    return given | chosen


def render_mismatch(encoder: str, trained: tuple[str, str | None], chosen: dict[str, Any]) -> str:
    serialization, instruction = trained
    return (
        f"encoder {encoder!r} was trained on records rendered {serialization} with instruction {instruction!r}; "
        f"this dataset renders them {chosen['serialization']} with instruction {chosen['instruction']!r}, so its "
        "scores differ from those measured when the encoder was trained"
    )


def render_warning(pool: EncoderPool | None, dataset: Dataset) -> str | None:
    """Why the dataset's scores may differ from its trained encoder's measured ones (None: they need not)."""
    try:
        trained = pool.spec(dataset.encoder).trained_render if pool is not None else None
    except UnknownEncoderError:
        return None
    chosen = {"serialization": dataset.serialization, "instruction": dataset.instruction}
    if trained is None or chosen == dict(zip(RENDER_FIELDS, trained, strict=True)):
        return None
    return render_mismatch(dataset.encoder, trained, chosen)


def describe(
    session: Session, dataset: Dataset, base_policy: IndexPolicy | None = None, pool: EncoderPool | None = None
) -> DatasetOut:
    """The dataset's configuration and status; ``index`` is its policy over ``base_policy`` (the process's)."""
    counts: dict[str, StatusCounts] = {}
    rows = session.execute(
        select(Record.source, Record.status, func.count())
        .where(Record.dataset_id == dataset.id)
        .group_by(Record.source, Record.status)
    )
    totals = StatusCounts()
    for source, status, count in rows:
        per_source = counts.setdefault(source, StatusCounts())
        if status in RECORD_STATUSES:
            setattr(per_source, status, getattr(per_source, status) + count)
            setattr(totals, status, getattr(totals, status) + count)
        per_source.total += count
        totals.total += count
    calibration = session.scalar(select(Calibration).where(Calibration.dataset_id == dataset.id))
    return DatasetOut(
        name=dataset.name,
        encoder=dataset.encoder,
        serialization=dataset.serialization,
        attributes=dataset.attributes,
        instruction=dataset.instruction,
        seen_attributes=dataset.seen_attributes,
        records=dict(sorted(counts.items())),
        totals=totals,
        calibration=calibration_out(calibration),
        index=IndexOptionsOut(**effective_policy(dataset, base_policy or IndexPolicy()).as_dict()),
        render_warning=render_warning(pool, dataset),
        encoder_version=dataset.encoder_version,
        created_at=dataset.created_at,
        updated_at=dataset.updated_at,
    )


def calibration_out(calibration: Calibration | None) -> CalibrationOut | None:
    if calibration is None:
        return None
    return CalibrationOut.model_validate(calibration)


def all_datasets(session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(Dataset.name)))
