"""The stored labels a training job reads: those whose two records exist, their folds, and the minimum counts.

Folds are fixed per label the first time a job reads it: a share of each class (``HOLDOUT_SHARE``) is held out and
no version ever trains on it. Checkpoint, threshold, probabilities and adoption are judged on the held-out labels
(a hold-out fold, not cross-fitting: one training per job keeps a job within minutes on a CPU, and a fold that never
moves keeps every version's judgement free of labels any version trained on); the identifier weight too once the
held-out labels hold enough matches, before that on every label scored by the base encoder
(``learning/train_job.py``)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session, aliased

from learning.errors import TooFewLabels
from llmatch.models import Label, Record

HOLDOUT_SHARE = 0.3
MIN_MATCHES = 10
MIN_NON_MATCHES = 10


@dataclass(frozen=True)
class StoredLabel:
    """A label with its two records' ids (``Record.id``) and its fold."""

    label_id: int
    left: tuple[str, str]  # (source, id)
    right: tuple[str, str]
    left_record: int
    right_record: int
    label: int
    holdout: bool | None


def usable_labels(session: Session, dataset_id: int) -> list[StoredLabel]:
    """The dataset's labels whose two records are stored, in label order."""
    left, right = aliased(Record), aliased(Record)
    rows = session.execute(
        select(Label, left.id, right.id)
        .join(
            left,
            and_(left.dataset_id == dataset_id, left.source == Label.left_source, left.external_id == Label.left_id),
        )
        .join(
            right,
            and_(
                right.dataset_id == dataset_id, right.source == Label.right_source, right.external_id == Label.right_id
            ),
        )
        .where(Label.dataset_id == dataset_id)
        .order_by(Label.id)
    )
    return [
        StoredLabel(
            label.id,
            (label.left_source, label.left_id),
            (label.right_source, label.right_id),
            left_id,
            right_id,
            label.label,
            label.holdout,
        )
        for label, left_id, right_id in rows
    ]


def check_enough(dataset: str, labels: list[StoredLabel]) -> None:
    """Raise ``TooFewLabels`` unless both classes reach their minimum."""
    matches = sum(1 for label in labels if label.label == 1)
    non_matches = len(labels) - matches
    if matches < MIN_MATCHES or non_matches < MIN_NON_MATCHES:
        raise TooFewLabels(dataset, matches, non_matches, MIN_MATCHES, MIN_NON_MATCHES)


def choose_folds(labels: list[StoredLabel], training_seed: int) -> dict[int, bool]:
    """The fold (True: held out) of every label without one, so that each class holds out ``HOLDOUT_SHARE`` of its
    labels (rounded up) as far as the new labels allow; drawn from the training seed and the number of labels."""
    chosen: dict[int, bool] = {}
    rng = random.Random(training_seed * 1_000_003 + len(labels))
    for value in (0, 1):
        of_class = [label for label in labels if label.label == value]
        held = sum(1 for label in of_class if label.holdout)
        new = [label for label in of_class if label.holdout is None]
        rng.shuffle(new)
        wanted = max(0, math.ceil(HOLDOUT_SHARE * len(of_class)) - held)
        chosen.update({label.label_id: i < wanted for i, label in enumerate(new)})
    return chosen


def assign_folds(session: Session, labels: list[StoredLabel], training_seed: int) -> list[StoredLabel]:
    """Give every label without a fold one (``choose_folds``) and store it; labels keep a fold once given. Returns
    the labels with their folds."""
    chosen = choose_folds(labels, training_seed)
    for holdout in (True, False):
        ids = [label_id for label_id, fold in chosen.items() if fold is holdout]
        for start in range(0, len(ids), 500):
            session.execute(update(Label).where(Label.id.in_(ids[start : start + 500])).values(holdout=holdout))
    return [label if label.holdout is not None else _with_fold(label, chosen[label.label_id]) for label in labels]


def _with_fold(label: StoredLabel, holdout: bool) -> StoredLabel:
    return StoredLabel(
        label.label_id, label.left, label.right, label.left_record, label.right_record, label.label, holdout
    )


def not_trained_on(labels: list[StoredLabel]) -> list[StoredLabel]:
    """The labels no version trained on: held out, or stored after the last job gave folds."""
    return [label for label in labels if label.holdout is not False]
