"""Threshold choice and probability mapping, checked against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from service.calibration import best_f1_threshold, decision_metrics, fit_probability, probability


def brute_force_best_f1(scores: np.ndarray, labels: np.ndarray) -> float:
    return max(decision_metrics(scores, labels, float(t)).f1 for t in np.unique(scores))


@pytest.mark.parametrize("seed", range(20))
def test_chosen_threshold_reaches_the_best_f1(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(0.6 + 0.2 * labels, 0.15), 2)  # rounding makes ties
    choice = best_f1_threshold(scores, labels)
    assert choice.f1 == pytest.approx(brute_force_best_f1(scores, labels))
    again = decision_metrics(scores, labels, choice.threshold)
    assert (again.precision, again.recall, again.f1) == pytest.approx((choice.precision, choice.recall, choice.f1))


def test_threshold_sits_between_the_classes_when_separable():
    scores = np.array([0.2, 0.3, 0.5, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1])
    choice = best_f1_threshold(scores, labels)
    assert choice.f1 == 1.0 and choice.threshold == pytest.approx(0.65)


def test_probability_is_monotonic_and_calibrated_in_the_middle():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    scores = rng.normal(0.5 + 0.3 * labels, 0.1)
    mapping = fit_probability(scores, labels)
    values = [probability(mapping, s) for s in np.linspace(0, 1, 50)]
    assert values == sorted(values) and values[0] < 0.01 and values[-1] > 0.99
    assert probability(mapping, 0.65) == pytest.approx(0.5, abs=0.1)  # halfway between the two classes
    assert probability(mapping, -1e6) == 0.0
