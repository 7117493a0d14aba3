"""``bench/selection.py``: the held-out fold a job would hold out, and each metric's choice scored on valid.csv."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from bench import selection
from encoding.registry import EncoderPool
from evaluation import deepmatcher
from matching.calibration import best_f1_threshold, decision_metrics

SMALL = Path(__file__).parent / "data" / "abt_buy_small"


def test_each_metric_chooses_the_weight_that_scores_best_on_the_jobs_held_out_fold(pool: EncoderPool) -> None:
    benchmark = deepmatcher.load(SMALL)
    space = selection.Space.of(benchmark, pool, review={})
    labels = selection.random_labels(benchmark, 40, seed=3)
    matches = sum(label for _, _, label in labels)

    rows = selection.choose(space, pool.spec("minilm"), labels, seed=3)

    assert [row["metric"] for row in rows] == ["f1", "average_precision"]
    assert {row["holdout_matches"] for row in rows} == {math.ceil(0.3 * matches)}
    assert {row["holdout_pairs"] for row in rows} == {math.ceil(0.3 * matches) + math.ceil(0.3 * (40 - matches))}
    held = selection.held_out(labels, seed=3)
    assert len(held) == rows[0]["holdout_pairs"]
    weights = [float(w) for w in selection.WEIGHTS.split(",")]
    metrics = {
        "f1": lambda scores, truth: best_f1_threshold(scores, truth).f1,
        "average_precision": lambda scores, truth: average_precision_score(truth, scores),
    }
    for row in rows:
        # the job's own path (select_identifier_weight encodes the held-out records) and this space agree
        by_weight = [metrics[row["metric"]](*space.scores(held, w)) for w in weights]
        assert by_weight[weights.index(row["weight"])] == pytest.approx(max(by_weight), abs=1e-3)
        threshold = best_f1_threshold(*space.scores(held, row["weight"])).threshold
        assert row["valid_f1"] == pytest.approx(
            decision_metrics(*space.scores(space.valid, row["weight"]), threshold).f1
        )


def test_the_table_pairs_the_metrics_by_seed() -> None:
    rows = []
    for seed, (f1, ap) in enumerate([(0.5, 0.6), (0.4, 0.6), (0.6, 0.6)]):
        for metric, value in (("f1", f1), ("average_precision", ap)):
            rows.append(
                {
                    "dataset": "d",
                    "budget": 100,
                    "strategy": "review",
                    "seed": seed,
                    "metric": metric,
                    "weight": 0.1,
                    "holdout_pairs": 30,
                    "holdout_matches": 9,
                    "valid_f1": value,
                    "valid_best_f1": value,
                }
            )
    args = type("Args", (), {"budgets": [100]})()
    table = selection.markdown(rows, args)
    assert "0.500 ± " in table and "0.600 ± 0.000" in table
    assert f"+{np.mean([0.1, 0.2, 0.0]):.3f} ± " in table
