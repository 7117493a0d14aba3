"""Which unlabelled candidate pairs the review queue asks about, and in what order.

A label moves the threshold only if its pair's score lies near it, so the queue asks about the pairs nearest
the current threshold (``review_threshold``): the calibrated one; while uncalibrated, one fitted on the stored
labels when they hold both classes; with labels of one class only, halfway between the most extreme of them and
the end of the score range where the other class must lie (so the first match, or non-match, is found); before
any label, the middle of the candidate pairs' score range. ``balanced`` takes the nearest pairs alternately from
above and below that threshold; ``diverse`` keeps a page from asking about one record many times (one pair per
record, then the rest in order).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from matching import calibration as calib
from matching.pairs import EncodedRecords

Strategy = Literal["uncertainty", "balanced", "diverse"]
Basis = Literal["calibration", "labels", "middle", "none"]
PairKey = tuple[str, str, str, str]  # (left source, left id, right source, right id), as service.labels keys them


def choose(
    pairs: dict[tuple[int, int], float], threshold: float, limit: int, strategy: Strategy
) -> list[tuple[int, int]]:
    """Up to ``limit`` of the pairs (record ids -> score), the most informative first by ``strategy``."""
    ordered = sorted(pairs, key=lambda ids: (abs(pairs[ids] - threshold), -pairs[ids], ids))
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
