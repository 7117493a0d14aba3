"""A dataset's stored labels and records as training data: the train fold to train on, the held-out fold (labels
no version trained on) to choose the checkpoint on (and the identifier weight, once it holds enough matches),
rendered as the service renders them."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from encoding.recipe import Recipe, record_input
from learning.labels import StoredLabel, not_trained_on
from llmatch.models import Dataset, Record
from training.data import TextPair, TrainingData


@dataclass(frozen=True)
class DatasetConfig:
    """What the dataset's text and base encoder were when the job started: a version trained on it fits only
    while the dataset keeps it."""

    encoder: str
    serialization: str
    attributes: tuple[str, ...] | None
    instruction: str | None

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetConfig:
        attributes = tuple(dataset.attributes) if dataset.attributes is not None else None
        return cls(dataset.encoder, dataset.serialization, attributes, dataset.instruction)


def record_key(dataset: str, ref: tuple[str, str]) -> str:
    return f"{dataset}/{ref[0]}/{ref[1]}"


def training_data(session: Session, dataset: Dataset, labels: list[StoredLabel], max_chars: int) -> TrainingData:
    """The labelled records rendered by the dataset's recipe; ``train`` holds the train fold, ``valid`` the
    labels no version trained on."""
    recipe = Recipe.of_dataset(dataset, max_chars)
    data = TrainingData([dataset.name], dataset.serialization, dataset.instruction)
    wanted = sorted({label.left_record for label in labels} | {label.right_record for label in labels})
    for start in range(0, len(wanted), 500):
        rows = session.execute(
            select(Record.source, Record.external_id, Record.attributes).where(
                Record.id.in_(wanted[start : start + 500])
            )
        )
        for source, external_id, attributes in rows:
            data.inputs[record_key(dataset.name, (source, external_id))] = record_input(attributes, recipe).item
    data.splits["train"][dataset.name] = [_pair(dataset.name, label) for label in labels if label.holdout is False]
    data.splits["valid"][dataset.name] = [_pair(dataset.name, label) for label in not_trained_on(labels)]
    return data


def _pair(dataset: str, label: StoredLabel) -> TextPair:
    return TextPair(record_key(dataset, label.left), record_key(dataset, label.right), label.label)
