"""Threshold choice and probability mapping, checked against brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest

from matching.calibration import (
    best_f1_threshold,
    brier_score,
    calibration_bins,
    decision_metrics,
    expected_calibration_error,
    fit_platt,
    fit_probability,
    probabilities,
    probability,
)


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


def test_expected_calibration_error_against_a_direct_count():
    rng = np.random.default_rng(1)
    chances = np.append(rng.uniform(0, 1, 500), [0.0, 1.0, 14 / 15])  # the ends and a bin edge
    labels = (rng.uniform(0, 1, chances.size) < chances**2).astype(int)  # overconfident below 1
    bins = calibration_bins(chances, labels)
    assert sum(b["pairs"] for b in bins) == chances.size and len(bins) == 15
    assert bins[-1]["low"] == pytest.approx(14 / 15) and 1.0 in chances[chances >= bins[-1]["low"]]
    error = 0.0
    for number in range(15):  # [k/15, (k+1)/15), the last bin closed
        inside = (chances >= number / 15) & ((chances < (number + 1) / 15) | (number == 14))
        error += inside.sum() / chances.size * abs(chances[inside].mean() - labels[inside].mean())
    assert expected_calibration_error(chances, labels) == pytest.approx(error)
    assert expected_calibration_error(labels.astype(float), labels) == 0.0
    assert brier_score(chances, labels) == pytest.approx(np.mean((chances - labels) ** 2))


def test_mappings_stored_before_isotonic_existed_still_give_their_probabilities():
    stored = json.loads('{"method": "platt", "coef": 12.5, "intercept": -10.0}')  # as calibrations hold them
    assert probability(stored, 0.8) == pytest.approx(0.5)
    assert probability(stored, 0.9) == pytest.approx(1 / (1 + np.exp(-1.25)))
    assert probability({"coef": 12.5, "intercept": -10.0}, 0.8) == pytest.approx(0.5)  # no method: Platt


def plateau_pairs(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose match rate is not a logistic curve: 2 % below 0.6, 50 % from 0.6 to 0.9, 98 % above."""
    scores = rng.uniform(0.3, 1.0, count)
    rate = np.select([scores < 0.6, scores < 0.9], [0.02, 0.5], 0.98)
    return scores, (rng.uniform(0, 1, count) < rate).astype(int)


def test_isotonic_is_chosen_where_platt_scaling_cannot_be_calibrated():
    rng = np.random.default_rng(2)
    scores, labels = plateau_pairs(rng, 3000)
    held_scores, held_labels = plateau_pairs(rng, 3000)
    mapping = fit_probability(scores, labels)
    assert mapping["method"] == "isotonic"
    assert mapping["cross_validated_brier"]["isotonic"] < mapping["cross_validated_brier"]["platt"]
    platt = fit_probability(scores[:4], np.array([0, 1, 0, 1]))  # too few pairs to hold any out: Platt
    assert platt["method"] == "platt"
    logistic = fit_platt(scores, labels)
    assert expected_calibration_error(probabilities(logistic, held_scores), held_labels) > 0.05
    assert expected_calibration_error(probabilities(mapping, held_scores), held_labels) <= 0.05
    stored = json.loads(json.dumps(mapping))  # what the calibrations table keeps
    values = probabilities(stored, np.linspace(-1, 1, 201))
    assert (np.diff(values) >= 0).all() and 0 <= values[0] and values[-1] <= 1
    assert probability(stored, 0.75) == pytest.approx(0.5, abs=0.05)


def test_platt_scaling_is_kept_where_the_match_rate_is_logistic():
    rng = np.random.default_rng(3)
    scores = rng.uniform(0.3, 1.0, 2000)
    labels = (rng.uniform(0, 1, scores.size) < 1 / (1 + np.exp(-12 * (scores - 0.7)))).astype(int)
    mapping = fit_probability(scores, labels)
    assert mapping["method"] == "platt" and mapping["coef"] == pytest.approx(12, rel=0.25)
