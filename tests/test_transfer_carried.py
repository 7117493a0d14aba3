"""The leave-one-out figure for a user with no labels: threshold and mapping carried over from other benchmarks."""

from __future__ import annotations

import numpy as np

from bench import transfer


def test_the_carried_threshold_is_fitted_on_the_other_benchmarks_pairs_only():
    valid_scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    valid_labels = np.array([1, 1, 1, 0, 0, 1, 0, 0])
    test_scores = np.array([0.95, 0.66, 0.64, 0.1])
    figures = transfer.carried_figures(valid_scores, valid_labels, test_scores, np.array([1, 1, 0, 0]))
    assert np.isclose(figures["threshold"], 0.65)  # halfway between 0.7 (lowest accepted on valid) and 0.6
    assert np.isclose(figures["valid_f1"], 6 / 7)  # precision 1, recall 3/4
    assert (figures["test_precision"], figures["test_recall"], figures["test_f1"]) == (1.0, 1.0, 1.0)
    # the held-out labels decide nothing: flipping them moves only the test figures
    flipped = transfer.carried_figures(valid_scores, valid_labels, test_scores, np.array([0, 0, 1, 1]))
    assert flipped["threshold"] == figures["threshold"]
    assert flipped["probability_method"] == figures["probability_method"]
    assert flipped["test_f1"] == 0.0


def test_scored_pairs_are_read_from_an_evaluation(tmp_path):
    path = tmp_path / "test_pairs.csv"
    path.write_text(
        "left_id,right_id,label,score,probability,decision,outcome\n"
        "1,7,1,0.912000,0.800000,1,true match\n"
        "2,8,0,0.301000,0.010000,0,non-match\n"
    )
    pairs = transfer.read_scored_pairs(path)
    assert pairs["ids"] == [("1", "7"), ("2", "8")]
    assert pairs["labels"].tolist() == [1, 0]
    assert pairs["scores"].tolist() == [0.912, 0.301]
