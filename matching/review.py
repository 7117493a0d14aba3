"""Which unlabelled candidate pairs the review queue asks about, and in what order.

A label moves the threshold only if its pair's score lies near it, so the queue asks about the pairs nearest
the current threshold (``review_threshold``): the calibrated one; while uncalibrated, one fitted on the stored
labels when they hold both classes; with labels of one class only, halfway between the most extreme of them and
the end of the score range where the other class must lie (so the first match, or non-match, is found); before
any label, the middle of the candidate pairs' score range.

The default order, ``teaching``, does three things on each page: it asks first about the pairs nearest that
threshold; it spreads the page over records (one pair per record while unused records remain, then the rest);
and one slot in five (at least one on a page of three or more) explores away from the threshold, alternately
the highest-scoring pair left (the likeliest match, so matches are found even while the threshold is wrong) and
the pair nearest a score drawn at random over the score range. The draw is seeded by the caller (the service
uses the number of stored labels), so the same labelled state gives the same page. The other orders stay
selectable: ``uncertainty`` is plain nearness; ``balanced`` takes the nearest pairs alternately from above and
below the threshold; ``diverse`` is nearness with the spread over records and no exploration.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from matching import calibration as calib
from matching.pairs import EncodedRecords

Strategy = Literal["teaching", "uncertainty", "balanced", "diverse"]
Basis = Literal["calibration", "labels", "middle", "none"]
PairKey = tuple[str, str, str, str]  # (left source, left id, right source, right id), as service.labels keys them
Ids = tuple[int, int]  # a candidate pair's record ids

EXPLORE_EVERY = 5  # one slot in this many of a ``teaching`` page explores away from the threshold


def choose(
    pairs: dict[Ids, float], threshold: float, limit: int, strategy: Strategy = "teaching", seed: int = 0
) -> list[Ids]:
    """Up to ``limit`` of the pairs (record ids -> score), the most informative first by ``strategy``; ``seed``
    fixes the exploring draws of ``teaching``."""
    ordered = sorted(pairs, key=lambda ids: (abs(pairs[ids] - threshold), -pairs[ids], ids))
    if strategy == "teaching":
        return teaching(ordered, pairs, limit, seed)
    if strategy == "balanced":
        return balanced(ordered, pairs, threshold, limit)
    if strategy == "diverse":
        return diverse(ordered, limit)
    return ordered[:limit]


def review_threshold(
    records: EncodedRecords,
    labelled: dict[PairKey, int],
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


def balanced(
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


def diverse(ordered: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
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


def exploring_slots(size: int) -> set[int]:
    """The positions of a page of ``size`` pairs that explore: the last of every ``EXPLORE_EVERY``, and on a
    shorter page of three or more its last one."""
    if size < 3:
        return set()
    return {min(EXPLORE_EVERY * j + EXPLORE_EVERY - 1, size - 1) for j in range(max(1, size // EXPLORE_EVERY))}


def teaching(ordered: list[Ids], pairs: dict[Ids, float], limit: int, seed: int) -> list[Ids]:
    """Nearest the threshold first (``ordered``), spread over records, with the ``exploring_slots`` taken
    alternately by the highest-scoring pair left and the pair nearest a random score (``seed``)."""
    page = _Page()
    nearest = _Scan(ordered)
    highest = _Scan(sorted(pairs, key=lambda ids: (-pairs[ids], ids)))
    draws = _Draws(pairs, seed)
    explore = exploring_slots(min(limit, len(pairs)))
    for slot in range(min(limit, len(pairs))):
        if slot not in explore:
            page.take(nearest.next(page))
        elif len(page.explored) % 2 == 0:
            page.take(highest.next(page), explored=True)
        else:
            page.take(draws.next(page), explored=True)
    return page.chosen


class _Page:
    """The pairs chosen so far and the records they use."""

    def __init__(self) -> None:
        self.chosen: list[Ids] = []
        self.explored: list[Ids] = []
        self.taken: set[Ids] = set()
        self.used: set[int] = set()

    def fresh(self, ids: Ids) -> bool:
        """Neither record is on the page yet (so the pair is not either)."""
        return ids[0] not in self.used and ids[1] not in self.used

    def take(self, ids: Ids, explored: bool = False) -> None:
        self.chosen.append(ids)
        self.taken.add(ids)
        self.used.update(ids)
        if explored:
            self.explored.append(ids)


class _Scan:
    """One order of the pairs, read as a page fills: the first pair on fresh records, else the first not taken.
    A pair once passed over as not fresh never becomes fresh again, so each cursor only moves forward."""

    def __init__(self, order: list[Ids]) -> None:
        self.order = order
        self.fresh = 0
        self.any = 0

    def next(self, page: _Page) -> Ids:
        while self.fresh < len(self.order):
            ids = self.order[self.fresh]
            self.fresh += 1
            if page.fresh(ids):
                return ids
        while self.order[self.any] in page.taken:  # the page is never longer than the pairs: one is left
            self.any += 1
        return self.order[self.any]


class _Draws:
    """The pair nearest a score drawn uniformly over the pairs' score range, on fresh records while any are left
    (arrays over the pairs in score order, so a draw costs a few vector operations)."""

    def __init__(self, pairs: dict[Ids, float], seed: int) -> None:
        self.order = sorted(pairs, key=lambda ids: (pairs[ids], ids))
        self.position = {ids: p for p, ids in enumerate(self.order)}
        self.scores = np.array([pairs[ids] for ids in self.order])
        self.records = np.array(self.order, dtype=np.int64).reshape(-1, 2)
        self.taken = np.zeros(len(self.order), dtype=bool)
        self.applied = 0
        self.rng = np.random.default_rng(seed)

    def next(self, page: _Page) -> Ids:
        for ids in page.chosen[self.applied :]:
            self.taken[self.position[ids]] = True
        self.applied = len(page.chosen)
        target = self.rng.uniform(self.scores[0], self.scores[-1])
        used = np.fromiter(page.used, dtype=np.int64, count=len(page.used))
        fresh = ~np.isin(self.records, used).any(axis=1)
        allowed = fresh if fresh.any() else ~self.taken
        distance = np.where(allowed, np.abs(self.scores - target), np.inf)
        return self.order[int(np.argmin(distance))]
