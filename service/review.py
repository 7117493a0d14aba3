"""The review queue as the API serves it: unlabelled candidate pairs whose labels would teach the current model
the most, each shaped as a ``ReviewPair`` with its records' attributes and probability. Which pairs, and in what
order, is the engine's (``matching.review``: by default nearest the threshold first, spread over records, with
some slots exploring away from it); its random draws are seeded by the number of stored labels, like the sample
below, so the same labelled state gives the same page.

The cost of a call is bounded: candidate pairs are those of at most ``max_records`` query records (all of them
in a smaller dataset; else a repeatable sample that changes as labels are stored and takes records not yet in
a label first), searched in the process's loaded indexes; only their vectors and the labelled records' are read.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from llmatch.models import Dataset, Record
from matching import calibration as calib
from matching.pairs import EncodedRecords, indexed_candidate_pairs, load_encoded, query_sample
from matching.registry import IndexRegistry
from matching.review import Strategy, choose, review_threshold
from service.decisions import active_calibration
from service.labels import labelled_keys, pair_key
from service.record_refs import record_conditions
from service.schemas import ReviewOut, ReviewPair, ReviewRecord

Names = dict[int, tuple[str, str]]


def review(
    session: Session,
    registry: IndexRegistry,
    dataset: Dataset,
    limit: int,
    k: int,
    strategy: Strategy = "teaching",
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
    threshold, basis = review_threshold(known, labelled, pairs, calibration.threshold if calibration else None)
    chosen = choose(pairs, threshold, limit, strategy, seed=len(labelled))
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
    for condition in record_conditions(refs):
        record_ids += session.scalars(select(Record.id).where(Record.dataset_id == dataset_id, condition))
    return load_encoded(session, dataset_id, record_ids)


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
