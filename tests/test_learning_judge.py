"""The adoption judge: best-threshold F1 on the held-out pairs decides, both encoders' average precision on the same
pairs is reported beside it, and pairs one encoder has no vectors for are left out of both."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from learning.judge import judge, pair_scores
from learning.labels import StoredLabel


def unit(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle)])


def held_out(truth: list[int]) -> list[StoredLabel]:
    """Pair i joins record 2i (left) and 2i+1 (right)."""
    return [
        StoredLabel(i, ("a", str(i)), ("b", str(i)), 2 * i, 2 * i + 1, label, True) for i, label in enumerate(truth)
    ]


def vectors(angles: list[float]) -> dict[int, np.ndarray]:
    """Left records at angle 0, each right record at its pair's angle: the pair's cosine is cos(angle)."""
    found = {}
    for i, angle in enumerate(angles):
        found[2 * i], found[2 * i + 1] = unit(0.0), unit(angle)
    return found


TRUTH = [1, 1, 1, 0, 0, 0]
SEPARATES = [0.1, 0.2, 0.3, 1.0, 1.1, 1.2]  # every match above every non-match
MIXES = [0.1, 1.15, 0.3, 1.0, 1.1, 1.2]  # the second match ranked below two non-matches


def test_a_candidate_that_separates_the_classes_better_is_adopted_and_both_average_precisions_are_reported():
    labels = held_out(TRUTH)
    verdict = judge(labels, current=vectors(MIXES), candidate=vectors(SEPARATES))
    assert verdict.adopted
    assert verdict.candidate.f1 == 1.0 > verdict.current.f1
    assert verdict.candidate_average_precision == 1.0
    expected = average_precision_score(TRUTH, pair_scores(labels, vectors(MIXES)))
    assert verdict.current_average_precision == pytest.approx(expected)
    metrics = verdict.as_metrics()
    assert metrics["candidate_average_precision"] == 1.0
    assert metrics["current_average_precision"] == pytest.approx(expected, abs=1e-4) and expected < 1.0


def test_a_candidate_that_does_worse_is_not_adopted():
    verdict = judge(held_out(TRUTH), current=vectors(SEPARATES), candidate=vectors(MIXES))
    assert not verdict.adopted
    assert "not adopted" in verdict.reason
    assert verdict.candidate_average_precision < verdict.current_average_precision == 1.0


def test_pairs_the_current_encoder_has_no_vectors_for_are_left_out_of_both_sides():
    labels = held_out(TRUTH)
    current = vectors(MIXES)
    del current[2 * 1 + 1]  # the match the current encoder ranked low: its right record is not encoded yet
    verdict = judge(labels, current=current, candidate=vectors(SEPARATES))
    assert verdict.pairs == 5 and verdict.matches == 2
    assert verdict.current_average_precision == 1.0 == verdict.candidate_average_precision
    assert verdict.adopted  # a tie is adopted
