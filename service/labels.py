"""Labels people give to pairs: stored per dataset, one per unordered pair (the latest wins)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from llmatch.models import ENCODED, Dataset, Label, Record
from service.errors import Conflict
from service.limits import check_label_count
from service.record_refs import label_conditions, record_conditions
from service.schemas import CalibrateIn, LabelledPair, LabelOut, LabelsOut, LabelsStored

PairKey = tuple[str, str, str, str]  # (left source, left id, right source, right id), the lesser side left


def pair_key(left_source: str, left_id: str, right_source: str, right_id: str) -> PairKey:
    """The stored order of a pair: (source, id) sides sorted, so a pair and its mirror are one pair."""
    left, right = sorted([(left_source, left_id), (right_source, right_id)])
    return (*left, *right)


def put_labels(session: Session, dataset: Dataset, pairs: Sequence[LabelledPair], max_labels: int) -> LabelsStored:
    """Store labels; a pair labelled again (in either order, or twice in one batch) keeps the latest label. 422
    when the new pairs would bring the dataset past ``max_labels``."""
    latest: dict[PairKey, int] = {}
    for pair in pairs:
        latest[pair_key(pair.left_source, pair.left_id, pair.right_source, pair.right_id)] = pair.label
    existing = stored_labels(session, dataset, set(latest))
    check_label_count(dataset, count_labels(session, dataset), len(latest) - len(existing), max_labels)
    for key, label in latest.items():
        row = existing.get(key)
        if row is None:
            session.add(Label(dataset_id=dataset.id, **dict(zip(_FIELDS, key, strict=True)), label=label))
        elif row.label != label:
            row.label = label
            row.updated_at = func.now()
    session.flush()
    return LabelsStored(stored=len(latest), total=count_labels(session, dataset))


_FIELDS = ("left_source", "left_id", "right_source", "right_id")


def stored_labels(session: Session, dataset: Dataset, keys: set[PairKey]) -> dict[PairKey, Label]:
    """The stored labels of these pairs (keys as ``pair_key`` orders them)."""
    existing: dict[PairKey, Label] = {}
    for condition in label_conditions(keys):
        rows = session.scalars(select(Label).where(Label.dataset_id == dataset.id, condition))
        found = {(r.left_source, r.left_id, r.right_source, r.right_id): r for r in rows}
        existing.update({key: row for key, row in found.items() if key in keys})
    return existing


def count_labels(session: Session, dataset: Dataset) -> int:
    return int(session.scalar(select(func.count()).select_from(Label).where(Label.dataset_id == dataset.id)) or 0)


def list_labels(session: Session, dataset: Dataset) -> LabelsOut:
    rows = session.scalars(select(Label).where(Label.dataset_id == dataset.id).order_by(Label.id)).all()
    pairs = [
        LabelOut(
            left_source=r.left_source,
            left_id=r.left_id,
            right_source=r.right_source,
            right_id=r.right_id,
            label=r.label,
            updated_at=r.updated_at,
        )
        for r in rows
    ]
    return LabelsOut(pairs=pairs, total=len(pairs))


def labelled_keys(session: Session, dataset_id: int) -> dict[PairKey, int]:
    """Every labelled pair of a dataset (in stored order) and its label."""
    rows = session.execute(
        select(Label.left_source, Label.left_id, Label.right_source, Label.right_id, Label.label).where(
            Label.dataset_id == dataset_id
        )
    )
    return {(ls, li, rs, ri): label for ls, li, rs, ri, label in rows}


def delete_labels(session: Session, dataset: Dataset) -> int:
    return session.execute(delete(Label).where(Label.dataset_id == dataset.id)).rowcount or 0


def calibration_body(session: Session, dataset: Dataset, body: CalibrateIn) -> CalibrateIn:
    """The explicit-pairs form of ``{"from": "labels"}``: every stored label as a pair (409 while the stored
    labels lack a class: the request is valid, the stored state is not ready). While a trained version serves
    the dataset, the labels it was trained on sit out: its threshold is fitted on labels it did not learn."""
    if body.from_ is None:
        return body
    labelled = labelled_keys(session, dataset.id)
    trained_on = trained_keys(session, dataset.id) if dataset.encoder_version else set()
    labelled = {key: label for key, label in labelled.items() if key not in trained_on}
    encoded = encoded_refs(session, dataset.id, {side for key in labelled for side in (key[:2], key[2:])})
    # A label whose record was deleted (or waits to be encoded again) sits out until the record is back.
    labelled = {key: label for key, label in labelled.items() if key[:2] in encoded and key[2:] in encoded}
    positives = sum(labelled.values())
    left_out = (
        f" ({len(trained_on)} labels that encoder version {dataset.encoder_version} was trained on are left out: "
        "its threshold is fitted on labels it did not learn)"
        if trained_on
        else ""
    )
    if not labelled:
        raise Conflict(
            f"Dataset {dataset.name!r} has no stored labels of encoded records{left_out}; label pairs with "
            f"PUT /datasets/{dataset.name}/labels (GET /datasets/{dataset.name}/review suggests some) first."
        )
    if positives in (0, len(labelled)):
        missing = "matches (label 1)" if positives == 0 else "non-matches (label 0)"
        raise Conflict(
            f"Calibration needs both matches and non-matches; the {len(labelled)} stored labels it can use have "
            f"no {missing}{left_out}. Label more pairs first."
        )
    pairs = [
        LabelledPair(left_source=ls, left_id=li, right_source=rs, right_id=ri, label=label)
        for (ls, li, rs, ri), label in labelled.items()
    ]
    return CalibrateIn(pairs=pairs, objective=body.objective)


def trained_keys(session: Session, dataset_id: int) -> set[PairKey]:
    """The labelled pairs a training job trained on (``Label.holdout`` false), in stored order."""
    rows = session.execute(
        select(Label.left_source, Label.left_id, Label.right_source, Label.right_id).where(
            Label.dataset_id == dataset_id, Label.holdout.is_(False)
        )
    )
    return {(ls, li, rs, ri) for ls, li, rs, ri in rows}


def encoded_refs(session: Session, dataset_id: int, refs: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Those of these (source, id) references that name an encoded record of the dataset."""
    found: set[tuple[str, str]] = set()
    for condition in record_conditions(refs):
        rows = session.execute(
            select(Record.source, Record.external_id).where(
                Record.dataset_id == dataset_id, Record.status == ENCODED, condition
            )
        )
        found.update((source, rid) for source, rid in rows)
    return found
