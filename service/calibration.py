"""Choosing a dataset's threshold on labelled pairs and mapping scores to probabilities."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression


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
    predicted = scores >= threshold
    true_positives = int(np.sum(predicted & (labels == 1)))
    precision = true_positives / max(int(predicted.sum()), 1)
    recall = true_positives / max(int(labels.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return ThresholdChoice(threshold, precision, recall, f1)


def fit_probability(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Platt scaling: a logistic curve from score to probability of a match, fitted on the pairs."""
    model = LogisticRegression(C=1e4, max_iter=1000)
    model.fit(scores.reshape(-1, 1).astype(np.float64), labels)
    return {"method": "platt", "coef": float(model.coef_[0][0]), "intercept": float(model.intercept_[0])}


def probability(mapping: dict[str, Any], score: float) -> float:
    """The calibrated probability that a pair with this score is a match."""
    z = mapping["coef"] * score + mapping["intercept"]
    return 1.0 / (1.0 + math.exp(-z)) if z > -500 else 0.0
