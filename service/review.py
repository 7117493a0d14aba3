"""The review queue: unlabelled candidate pairs whose labels would teach the threshold the most.

A label moves the threshold only if its pair's score lies near it, so the queue asks about the pairs nearest
the current threshold: the calibrated one; while uncalibrated, one fitted on the stored labels when they hold
both classes; with labels of one class only, halfway between the most extreme of them and the end of the score
range where the other class must lie (so the first match, or non-match, is found); before any label, the
middle of the candidate pairs' score range. ``balanced`` takes the nearest pairs
alternately from above and below that threshold; ``diverse`` keeps a page from asking about one record many
times (one pair per record, then the rest in order).

The cost of a call is bounded: candidate pairs are those of at most ``max_records`` query records (all of them
in a smaller dataset; else a repeatable sample that changes as labels are stored and takes records not yet in
a label first), searched in the process's loaded indexes; only their vectors and the labelled records' are read.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from llmatch.models import Dataset, Record
from matching import calibration as calib
from matching.index import IndexRegistry
from matching.pairs import EncodedRecords, indexed_candidate_pairs, load_encoded, query_sample
from service.decisions import active_calibration
from service.labels import labelled_keys, pair_key
from service.schemas import ReviewOut, ReviewPair, ReviewRecord

Strategy = Literal["uncertainty", "balanced", "diverse"]
Basis = Literal["calibration", "labels", "middle", "none"]
Names = dict[int, tuple[str, str]]


def review(
    session: Session,
    registry: IndexRegistry,
    dataset: Dataset,
    limit: int,
    k: int,
    strategy: Strategy = "uncertainty",
    max_records: int = 2000,
) -> ReviewOut:
    """Up to ``limit`` unlabelled candidate pairs, the most informative first."""
    labelled = labelled_keys(session, dataset.id)
    known = _labelled_records(session, dataset.id, labelled)
    sample = query_sample(registry, dataset.id, max_records, known.ids.tolist(), seed=len(labelled))
    found = indexed_candidate_pairs(session, registry, dataset.id, load_encoded(session, dataset.id, sample), k)
    pairs = {ids: score for ids, score in found.scores.items() if _key(found.names, *ids) not in labelled}
    if not pairs:
        return ReviewOut(pairs=[], threshold=None, basis="none")
    calibration = active_calibration(session, dataset)
    threshold, basis = _threshold(known, labelled, pairs, calibration.threshold if calibration else None)
    ordered = sorted(pairs, key=lambda ids: (abs(pairs[ids] - threshold), -pairs[ids], ids))
    if strategy == "balanced":
        chosen = _balanced(ordered, pairs, threshold, limit)
    elif strategy == "diverse":
        chosen = _diverse(ordered, limit)
    else:
        chosen = ordered[:limit]
    mapping = calibration.probability_model if calibration else None
    wanted = [record_id for ids in chosen for record_id in ids]
    rows = session.execute(select(Record.id, Record.attributes).where(Record.id.in_(wanted)))
    attributes = {record_id: attrs for record_id, attrs in rows}
    out = [_pair(found.names, ids, pairs[ids], mapping, attributes) for ids in chosen]
    return ReviewOut(pairs=out, threshold=threshold, basis=basis)


def _labelled_records(
    session: Session, dataset_id: int, labelled: dict[tuple[str, str, str, str], int]
) -> EncodedRecords:
    """The encoded records that stored labels name, with their vectors."""
    refs = sorted({(ls, li) for ls, li, _, _ in labelled} | {(rs, ri) for _, _, rs, ri in labelled})
    record_ids: list[int] = []
    for start in range(0, len(refs), 500):
        record_ids += session.scalars(
            select(Record.id).where(
                Record.dataset_id == dataset_id,
                tuple_(Record.source, Record.external_id).in_(refs[start : start + 500]),
            )
        )
    return load_encoded(session, dataset_id, record_ids)


def _threshold(
    records: EncodedRecords,
    labelled: dict[tuple[str, str, str, str], int],
    pairs: dict[tuple[int, int], float],
    calibrated: float | None,
) -> tuple[float, Basis]:
    if calibrated is not None:
        return calibrated, "calibration"
    row = {(s, i): r for r, (s, i) in enumerate(zip(records.sources, records.external_ids, strict=True))}
    scores, labels = [], []
    for (ls, li, rs, ri), label in labelled.items():
        if (ls, li) in row and (rs, ri) in row:
            scores.append(float(records.vectors[row[(ls, li)]] @ records.vectors[row[(rs, ri)]]))
            labels.append(label)
    if 0 < sum(labels) < len(labels):
        choice = calib.best_f1_threshold(np.array(scores), np.array(labels))
        return choice.threshold, "labels"
    values = list(pairs.values())
    low, high = min(values), max(values)
    if labels and sum(labels) == 0:  # only non-matches so far: look above the best of them for a first match
        return (max(max(scores), low) + high) / 2, "labels"
    if labels:  # only matches so far: look below the worst of them for a first non-match
        return (low + min(min(scores), high)) / 2, "labels"
    return (low + high) / 2, "middle"


def _balanced(
    ordered: list[tuple[int, int]], pairs: dict[tuple[int, int], float], threshold: float, limit: int
) -> list[tuple[int, int]]:
    """Nearest the threshold, alternately from above and from below it (candidate pairs are mostly
    non-matches, so plain nearness mostly asks about non-matches)."""
    above = [rows for rows in ordered if pairs[rows] >= threshold]
    below = [rows for rows in ordered if pairs[rows] < threshold]
    chosen: list[tuple[int, int]] = []
    for i in range(max(len(above), len(below))):
        chosen += [side[i] for side in (above, below) if i < len(side)]
        if len(chosen) >= limit:
            break
    return chosen[:limit]


def _diverse(ordered: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """In order, at most one pair per record; then the pairs passed over, in order, to fill the page."""
    seen: set[int] = set()
    first, rest = [], []
    for rows in ordered:
        if len(first) >= limit:
            break
        if seen & set(rows):
            rest.append(rows)
        else:
            first.append(rows)
            seen.update(rows)
    return (first + rest)[:limit]


def _key(names: Names, i: int, j: int) -> tuple[str, str, str, str]:
    return pair_key(*names[i], *names[j])


def _pair(
    names: Names, ids: tuple[int, int], score: float, mapping: dict | None, attributes: dict[int, dict]
) -> ReviewPair:
    left, right = sorted(ids, key=lambda record_id: names[record_id])
    return ReviewPair(
        left=_record(names, left, attributes),
        right=_record(names, right, attributes),
        score=score,
        probability=None if mapping is None else calib.probability(mapping, score),
    )


def _record(names: Names, record_id: int, attributes: dict[int, dict]) -> ReviewRecord:
    source, external_id = names[record_id]
    return ReviewRecord(source=source, id=external_id, attributes=attributes.get(record_id, {}))
