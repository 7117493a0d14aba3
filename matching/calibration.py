"""Choosing a dataset's threshold on labelled pairs and mapping scores to probabilities."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

CALIBRATION_BINS = 15  # equal-width probability bins of the expected calibration error
SELECTION_FOLDS = 5  # folds of the cross-validation that chooses the probability mapping


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    precision: float
    recall: float
    f1: float


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> ThresholdChoice:
    """The threshold maximising F1 of ``score >= threshold`` on these pairs.

    Among cut points with equal F1 the highest is kept; the threshold sits halfway between the lowest
    accepted score and the next lower one, so the same pairs are accepted with a margin on both sides.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    true_positives = np.cumsum(sorted_labels)
    accepted = np.arange(1, len(scores) + 1)
    # Only cut between distinct scores: the last position of each run of equal scores.
    last_of_run = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    precision = true_positives / accepted
    recall = true_positives / max(int(labels.sum()), 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    f1 = np.where(last_of_run, f1, -1.0)
    best = int(np.argmax(f1))
    lower = sorted_scores[best + 1] if best + 1 < len(sorted_scores) else sorted_scores[best] - 1e-6
    threshold = float((sorted_scores[best] + lower) / 2)
    return ThresholdChoice(threshold, float(precision[best]), float(recall[best]), float(f1[best]))


def expected_f1_threshold(
    mapping: dict[str, Any], population: np.ndarray, bounds: tuple[float, float] | None = None
) -> ThresholdChoice | None:
    """The threshold maximising the expected F1 of ``score >= threshold`` over a population of unlabelled pairs,
    each a match with the probability ``mapping`` gives its score (plug-in: expected true positives over the mean
    of accepted pairs and expected matches), among the cuts within ``bounds`` (``labelled_bounds``); precision,
    recall and F1 are those expectations. None without a population pair within the bounds.

    Labels chosen for what they teach (near the threshold) are not distributed like the pairs a dataset is asked
    about, so F1 maximised on them puts the threshold where their mix of easy and hard pairs wants it. The
    probability of a match given a score is what such labels still estimate fairly (they were chosen by score),
    and the population supplies the mix. Far outside the labelled scores that probability is extrapolated, hence
    the bounds.
    """
    scores = np.sort(np.asarray(population, dtype=np.float64))[::-1]
    if scores.size == 0:
        return None
    chances = probabilities(mapping, scores)
    expected_matches = float(chances.sum())
    true_positives = np.cumsum(chances)
    accepted = np.arange(1, len(scores) + 1)
    lower = np.append(scores[1:], scores[-1] - 1e-6)
    cuts = (scores + lower) / 2  # the threshold that accepts the pairs down to this one
    usable = np.append(scores[1:] != scores[:-1], True)
    if bounds is not None:
        usable &= (cuts >= bounds[0]) & (cuts <= bounds[1])
    if not usable.any():
        return None
    f1 = np.where(usable, 2 * true_positives / (accepted + expected_matches), -1.0)
    best = int(np.argmax(f1))
    recall = float(true_positives[best] / expected_matches) if expected_matches > 0 else 0.0
    return ThresholdChoice(float(cuts[best]), float(true_positives[best] / accepted[best]), recall, float(f1[best]))


def labelled_bounds(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The scores between the lowest-scoring match and the highest-scoring non-match of labelled pairs (both
    classes present): a threshold below it accepts pairs scored under every known match, one above it refuses
    pairs scored over every known non-match."""
    lowest_match = float(np.min(scores[labels == 1]))
    highest_non_match = float(np.max(scores[labels == 0]))
    return min(lowest_match, highest_non_match), max(lowest_match, highest_non_match)


def decision_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> ThresholdChoice:
    """Precision, recall and F1 of ``score >= threshold`` against the labels."""
    predicted = scores >= threshold
    true_positives = int(np.sum(predicted & (labels == 1)))
    precision = true_positives / max(int(predicted.sum()), 1)
    recall = true_positives / max(int(labels.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return ThresholdChoice(threshold, precision, recall, f1)


def fit_probability(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """A mapping from score to probability of a match, fitted on the pairs: Platt scaling or isotonic regression.

    Both are fitted on out-of-fold pairs (stratified, ``SELECTION_FOLDS`` folds, fixed seed) and the one whose
    held-out probabilities have the lower Brier score is refitted on every pair and kept; with fewer than
    ``SELECTION_FOLDS`` pairs of either class there is nothing to hold out and Platt scaling is used.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if min(int(labels.sum()), int((labels == 0).sum())) < SELECTION_FOLDS:
        return fit_platt(scores, labels)
    held_out = {name: np.zeros(len(scores)) for name in FITTERS}
    folds = StratifiedKFold(SELECTION_FOLDS, shuffle=True, random_state=0)
    for fit_rows, held_rows in folds.split(scores.reshape(-1, 1), labels):
        for name, fit in FITTERS.items():
            mapping = fit(scores[fit_rows], labels[fit_rows])
            held_out[name][held_rows] = probabilities(mapping, scores[held_rows])
    brier = {name: brier_score(values, labels) for name, values in held_out.items()}
    chosen = min(FITTERS, key=lambda name: (brier[name], name != "platt"))  # a tie keeps Platt
    return {**FITTERS[chosen](scores, labels), "cross_validated_brier": {k: round(v, 6) for k, v in brier.items()}}


def fit_platt(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Platt scaling: a logistic curve from score to probability of a match."""
    model = LogisticRegression(C=1e4, max_iter=1000)
    model.fit(scores.reshape(-1, 1).astype(np.float64), labels)
    return {"method": "platt", "coef": float(model.coef_[0][0]), "intercept": float(model.intercept_[0])}


def fit_isotonic(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Isotonic regression: the non-decreasing step curve closest to the labels, linear between its knots."""
    model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, labels)
    return {
        "method": "isotonic",
        "scores": [float(x) for x in model.X_thresholds_],
        "probabilities": [round(float(y), 6) for y in model.y_thresholds_],
    }


FITTERS = {"platt": fit_platt, "isotonic": fit_isotonic}


def probability(mapping: dict[str, Any], score: float) -> float:
    """The calibrated probability that a pair with this score is a match.

    Reads every stored mapping: Platt (``coef``, ``intercept``; the only kind before isotonic existed) and
    isotonic (knots ``scores`` -> ``probabilities``, linear between them, constant beyond the ends).
    """
    if mapping.get("method", "platt") == "isotonic":
        return float(np.interp(score, mapping["scores"], mapping["probabilities"]))
    z = mapping["coef"] * score + mapping["intercept"]
    return 1.0 / (1.0 + math.exp(-z)) if z > -500 else 0.0


def probabilities(mapping: dict[str, Any], scores: np.ndarray) -> np.ndarray:
    """``probability`` of each score."""
    return np.array([probability(mapping, float(score)) for score in scores], dtype=np.float64)


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared difference between the probability of a match and the label (0 is perfect)."""
    return float(np.mean((np.asarray(probabilities, dtype=np.float64) - labels) ** 2))


def calibration_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> list[dict]:
    """Pairs grouped by probability into ``bins`` equal-width bins of [0, 1] (the last one closed): for each
    non-empty bin, its range, pair count, mean probability and share of matches."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    index = np.minimum((probabilities * bins).astype(int), bins - 1)
    return [
        {
            "low": number / bins,
            "high": (number + 1) / bins,
            "pairs": int(inside.sum()),
            "mean_probability": float(probabilities[inside].mean()),
            "match_rate": float(labels[inside].mean()),
        }
        for number in range(bins)
        if (inside := index == number).any()
    ]


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Sum over equal-width probability bins of (share of pairs in the bin) x |mean probability - match rate|."""
    total = len(probabilities)
    return float(
        sum(
            b["pairs"] / total * abs(b["mean_probability"] - b["match_rate"])
            for b in calibration_bins(probabilities, labels, bins)
        )
    )
