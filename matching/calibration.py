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


def decision_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> ThresholdChoice:
    """Precision, recall and F1 of ``score >= threshold`` against the labels."""
    return ThresholdChoice(threshold, *precision_recall_f1(scores >= threshold, labels == 1))


def precision_recall_f1(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall and F1 of match decisions against the truth (both boolean arrays, pair by pair)."""
    true_positives = int(np.sum(predicted & truth))
    precision = true_positives / max(int(predicted.sum()), 1)
    recall = true_positives / max(int(truth.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


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
