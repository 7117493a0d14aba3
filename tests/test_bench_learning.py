"""``bench/learning.py``'s valid.csv figures: F1 of the served decisions against valid's own best threshold, read
from a real service (the small benchmark, calibrated from stored labels) and compared with a direct count; and
``bench/weight_choice.py``'s folds and table."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from bench import judge_audit, learning, weight_choice
from evaluation import deepmatcher
from matching.calibration import best_f1_threshold, decision_metrics

SMALL = Path(__file__).parent / "data" / "abt_buy_small"


def test_valid_f1_reads_the_served_decisions_and_valid_s_best_threshold(client, drain) -> None:
    benchmark = deepmatcher.load(SMALL)
    learning.ingest(client, "small", benchmark)
    drain()
    labels = [learning._pair_body(p) for p in benchmark.splits["train"]]
    assert client.put("/datasets/small/labels", json={"pairs": labels}).status_code == 200
    assert client.post("/datasets/small/calibrate", json={"from": "labels", "objective": "f1"}).status_code == 200
    threshold = client.get("/datasets/small").json()["calibration"]["threshold"]

    figures = learning.valid_f1(client, "small", benchmark)

    scores = []
    for p in benchmark.valid:
        answer = client.get(
            "/match",
            params={
                "dataset": "small",
                "left_source": "a",
                "left_id": p.left_id,
                "right_source": "b",
                "right_id": p.right_id,
            },
        ).json()
        scores.append(answer["score"])
    scores, truth = np.array(scores), np.array([p.label for p in benchmark.valid])
    assert figures["valid_f1"] == pytest.approx(decision_metrics(scores, truth, threshold).f1)
    assert figures["valid_best_f1"] == pytest.approx(best_f1_threshold(scores, truth).f1)
    assert figures["valid_best_f1"] >= figures["valid_f1"]


def test_the_valid_table_pairs_each_version_with_its_own_best_threshold() -> None:
    runs = [
        {"dataset": "d", "strategy": "review", "seed": s, "budget": 100, "valid_f1": f, "valid_best_f1": b}
        for s, (f, b) in enumerate([(0.70, 0.75), (0.60, 0.62), (0.80, 0.80)])
    ]
    runs.append({"dataset": "d", "strategy": "random", "seed": 0, "budget": 100, "test_f1": 0.5})  # an older row
    table = learning.valid_table(runs, argparse.Namespace(datasets=["d"], budgets=[100]))
    lines = table.splitlines()
    assert len(lines) == 3, "one row: the random arm has no valid figures"
    assert "| d | 100 | review | 0.700 ± " in lines[2]
    assert f"| {np.mean([-0.05, -0.02, 0.0]):+.3f} ± " in lines[2] and lines[2].endswith("| 3 |")


def test_weight_choice_holds_labels_as_a_job_does_and_pairs_its_arms_by_seed() -> None:
    labels = [("a1", "b1", 1), ("a2", "b2", 0), ("a3", "b3", 1), ("a4", "b4", 0)]
    inputs = {f"d/{side}/{side}{i}": f"{side}{i}" for side in "ab" for i in range(1, 6)}
    data = weight_choice.job_data("d", inputs, labels, held=[labels[1], labels[2]])
    assert [(p.left, p.right) for p in data.pairs("train")] == [("d/a/a1", "d/b/b1"), ("d/a/a4", "d/b/b4")]
    held = [(p.left, p.right, p.label) for p in data.pairs("valid")]
    assert held == [("d/a/a2", "d/b/b2", 0), ("d/a/a3", "d/b/b3", 1)]
    assert set(data.inputs) == {f"d/{side}/{side}{i}" for side in "ab" for i in range(1, 5)}, "labelled records only"

    rows = [
        {"dataset": "d", "budget": 100, "strategy": "review", "seed": seed, "arm": arm, "weight": weight,
         "valid_f1": f1, "valid_best_f1": f1 + 0.01}
        for seed, arm, weight, f1 in [(1, "fold", 0.1, 0.6), (0, "fold", 0.05, 0.5), (0, "labels", 0.4, 0.7),
                                      (1, "labels", 0.5, 0.6)]
    ]  # fmt: skip
    line = weight_choice.markdown(rows).splitlines()[2]
    assert "| d | 100 | review | 2 | 0.05,0.1 / 0.4,0.5 | 0.550 ± " in line
    assert f"| {np.mean([0.2, 0.0]):+.3f} ± " in line and line.endswith("| 0.560 / 0.660 |")


def test_the_judge_audit_reads_each_version_at_its_held_out_threshold_and_follows_each_rule() -> None:
    truth = np.array([1, 1, 0, 0])
    current = np.array([0.9, 0.4, 0.5, -np.inf])  # a pair without a vector is no match
    candidate = np.array([0.8, 0.7, 0.6, 0.1])
    metrics = {
        "current": {"threshold": 0.45, "f1": 0.8},
        "candidate": {"threshold": 0.65, "f1": 0.7},
        "current_average_precision": 0.70,
        "candidate_average_precision": 0.75,
    }
    row = judge_audit.audit(metrics, current, candidate, truth)
    assert row["current_valid_f1"] == pytest.approx(decision_metrics(np.array([0.9, 0.4, 0.5, -2.0]), truth, 0.45).f1)
    assert row["candidate_valid_f1"] == 1.0 and row["candidate_valid_average_precision"] == 1.0
    assert row["adopts"] == {"f1": False, "average_precision": True}
    assert judge_audit.followed(row, "f1") == row["current_valid_f1"] < judge_audit.followed(row, "average_precision")

    runs = [
        {"dataset": "d", "budget": 200, "strategy": "review", "judge_audit": row},
        {"dataset": "d", "budget": 200, "strategy": "review", "judge_audit": None},  # a refused job
    ]
    lines = judge_audit.markdown(runs, ["d"], [100, 200]).splitlines()
    assert len(lines) == 3
    assert lines[2].startswith("| d | 200 | review | 1 | 1 | 0 / 1 | 0 / 1 | ")
    assert lines[2].endswith("| +0.500 ± 0.000 | +0.500 ± 0.000 |")
