"""The switch: in one transaction, every record of the dataset takes its vector of the new version, the change
log tells every API process (each applies one transaction's entries in one poll), the dataset names the version,
its calibration is fitted again on labels the version did not train on, and the old vectors go."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from encoding.recipe import Recipe, record_input
from learning.dataset_data import DatasetConfig
from learning.judge import pair_scores, served_vectors
from learning.labels import not_trained_on, usable_labels
from llmatch.models import ENCODED, PENDING, Calibration, Dataset, EncoderVersion, IndexChange, Record
from llmatch.requeue import delete_orphans, requeue
from llmatch.vectors import find_embeddings
from matching import calibration as calib

log = logging.getLogger("llmatch.learning")


class ConfigurationChanged(RuntimeError):
    """The dataset's text or base encoder changed while the version was trained: it no longer fits."""


@dataclass(frozen=True)
class Switched:
    records: int  # records that took the new version's vector
    requeued: int  # records without one (changed or added at the last moment): encoded again by the worker
    retired: str | None  # the version that served before, if any
    calibration: dict | None  # threshold and metrics fitted on held-out labels; None when they lack a class


def switch_version(
    session: Session, dataset_id: int, version: str, encoder_key: str, config: DatasetConfig, max_chars: int
) -> Switched:
    dataset = session.scalar(select(Dataset).where(Dataset.id == dataset_id).with_for_update())
    if dataset is None or DatasetConfig.of(dataset) != config:
        raise ConfigurationChanged("the dataset's configuration changed while the version was trained")
    recipe = Recipe.of_dataset(dataset, max_chars)
    rows = session.execute(
        select(Record.id, Record.source, Record.attributes, Record.status, Record.embedding_id, Record.claim_token)
        .where(Record.dataset_id == dataset_id)
        .order_by(Record.id)
    ).all()
    hashes = {row.id: record_input(row.attributes, recipe).input_hash for row in rows if row.status == ENCODED}
    new_ids = find_embeddings(session, encoder_key, hashes.values())
    moved = [row for row in rows if row.status == ENCODED and hashes[row.id] in new_ids]
    stale = [row for row in rows if row.status == ENCODED and hashes[row.id] not in new_ids]
    claimed = [row for row in rows if row.status == PENDING and row.claim_token is not None]
    for start in range(0, len(moved), 1000):
        chunk = moved[start : start + 1000]
        session.execute(update(Record), [{"id": row.id, "embedding_id": new_ids[hashes[row.id]]} for row in chunk])
        session.execute(
            insert(IndexChange),
            [
                {
                    "dataset_id": dataset_id,
                    "source": row.source,
                    "record_id": row.id,
                    "embedding_id": new_ids[hashes[row.id]],
                }
                for row in chunk
            ],
        )
    # Records without a new vector, and those a worker is encoding with the old version now (its store is refused:
    # its claim is gone), go back to the queue and are encoded with the new version.
    again = [row.id for row in stale + claimed]
    for start in range(0, len(again), 500):
        requeue(session, Record.id.in_(again[start : start + 500]))
    if stale:
        session.execute(
            insert(IndexChange),
            [
                {"dataset_id": dataset_id, "source": row.source, "record_id": row.id, "embedding_id": None}
                for row in stale
            ],
        )
    retired = dataset.encoder_version
    dataset.encoder_version = version
    retire_serving_version(session, dataset_id)
    session.execute(update(EncoderVersion).where(EncoderVersion.name == version).values(status="serving"))
    calibration = refit_calibration(session, dataset, encoder_key)
    delete_orphans(session, sorted({row.embedding_id for row in moved if row.embedding_id is not None}))
    log.info(
        "dataset %r now served by %s: %d records switched, %d re-queued", dataset.name, version, len(moved), len(again)
    )
    return Switched(len(moved), len(again), retired, calibration)


def retire_serving_version(session: Session, dataset_id: int) -> None:
    """Mark the version that serves the dataset (if any) as serving no more: replaced, or its text changed."""
    session.execute(
        update(EncoderVersion)
        .where(EncoderVersion.dataset_id == dataset_id, EncoderVersion.status == "serving")
        .values(status="retired")
    )


def refit_calibration(session: Session, dataset: Dataset, encoder_key: str) -> dict | None:
    """Fit the threshold and probabilities on the labels the serving version did not train on, with the vectors
    the records hold now (call after they took the version's); without both classes the dataset is uncalibrated."""
    labels = not_trained_on(usable_labels(session, dataset.id))
    vectors = served_vectors(session, dataset.id, labels)
    kept = [x for x in labels if x.left_record in vectors and x.right_record in vectors]
    truth = np.array([x.label for x in kept], dtype=np.int64)
    session.execute(delete(Calibration).where(Calibration.dataset_id == dataset.id))
    session.expire(dataset, ["calibration"])
    if not kept or truth.sum() in (0, len(truth)):
        return None
    scores = pair_scores(kept, vectors)
    choice = calib.best_f1_threshold(scores, truth)
    row = Calibration(
        dataset_id=dataset.id,
        encoder_key=encoder_key,
        objective="f1",
        threshold=choice.threshold,
        precision=choice.precision,
        recall=choice.recall,
        f1=choice.f1,
        pairs=len(kept),
        positives=int(truth.sum()),
        probability_model=calib.fit_probability(scores, truth),
    )
    session.add(row)
    session.flush()
    return {"threshold": round(choice.threshold, 4), "f1": round(choice.f1, 4), "pairs": len(kept)}
