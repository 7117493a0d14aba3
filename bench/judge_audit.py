"""What the adoption judge decided, against what valid.csv says of the two versions it compared.

A job compares the version it trained with the one serving, on its held-out fold: best-threshold F1 decides
(`learning/judge.py`), and both versions' average precision on the fold is reported beside it. For each job of a
learning curve, `bench.learning` reads valid.csv scores of the serving version before the job and of the candidate
after it (served when adopted; encoded here from its kept folder when not: the server runs with
`LLMATCH_KEEP_REJECTED_VERSIONS=1`). Each version is read at the threshold the held-out fold gave it, so valid F1
says which of the two would have served better, and the table says how often each rule (F1, average precision)
picked that one, and what valid F1 following each rule gives, one job at a time (the curve itself follows F1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score

from bench import common
from encoding.recipe import Recipe, record_input
from encoding.registry import load_encoder, spec_from_options
from encoding.render import RenderConfig
from encoding.versions import SERVING_STAGE, version_root
from evaluation import deepmatcher
from matching.calibration import precision_recall_f1

RULES = ("f1", "average_precision")
UNSCORED = -2.0  # below every cosine: a pair whose records have no vector is never a match


def kept_version_scores(
    models_dir: Path, version: str, benchmark: deepmatcher.Benchmark, rendering: dict[str, Any], max_chars: int
) -> np.ndarray:
    """valid.csv cosines of a version from its folder, with the records rendered as the service renders them."""
    spec = spec_from_options(version, version_root(models_dir, version) / SERVING_STAGE)
    encoder = load_encoder(spec, "cpu")
    config = RenderConfig(rendering["serialization"], benchmark.attributes, rendering["instruction"])
    recipe = Recipe(config, (), max_chars)
    tables = {"a": {r["id"]: r for r in benchmark.table_a}, "b": {r["id"]: r for r in benchmark.table_b}}
    keys = sorted({("a", p.left_id) for p in benchmark.valid} | {("b", p.right_id) for p in benchmark.valid})
    inputs = [record_input(tables[source][rid]["attributes"], recipe).item for source, rid in keys]
    vectors = dict(zip(keys, encoder.encode(inputs, batch_size=spec.batch_size), strict=True))
    return np.array([float(vectors[("a", p.left_id)] @ vectors[("b", p.right_id)]) for p in benchmark.valid])


def audit(metrics: dict[str, Any], current: np.ndarray, candidate: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Valid F1 (at each version's held-out threshold) and average precision of both versions, and what each rule
    decided on the held-out fold."""
    row: dict[str, Any] = {}
    for side, scores in (("current", current), ("candidate", candidate)):
        finite = np.where(np.isfinite(scores), scores, UNSCORED)
        predicted = finite >= metrics[side]["threshold"]
        row[f"{side}_valid_f1"] = precision_recall_f1(predicted, truth.astype(bool))[2]
        row[f"{side}_valid_average_precision"] = float(average_precision_score(truth, finite))
    row["adopts"] = {
        "f1": metrics["candidate"]["f1"] >= metrics["current"]["f1"],
        "average_precision": metrics["candidate_average_precision"] >= metrics["current_average_precision"],
    }
    return row


def followed(row: dict[str, Any], rule: str) -> float:
    """Valid F1 of the version a rule would serve after this job."""
    return row["candidate_valid_f1"] if row["adopts"][rule] else row["current_valid_f1"]


def markdown(runs: list[dict[str, Any]], datasets: list[str], budgets: list[int]) -> str:
    """Per benchmark, budget and strategy: how often each rule adopted the version valid.csv prefers, and the valid
    F1 of following each rule, and of adopting every version (mean ± 95% t half-width over the jobs, paired)."""
    headers = ["benchmark", "labels", "strategy", "jobs", "candidate better on valid", "adopted: F1 / AP"]
    headers += ["valid's choice: F1 / AP", "valid F1 following F1", "following AP", "AP − F1 (paired)"]
    headers += ["adopting every version − F1 (paired)"]
    rows = []
    for name in datasets:
        for budget in sorted(budgets):
            for strategy in ("review", "random"):
                found = [
                    r["judge_audit"]
                    for r in runs
                    if (r["dataset"], r["budget"], r["strategy"]) == (name, budget, strategy) and r.get("judge_audit")
                ]
                if not found:
                    continue
                better = [a["candidate_valid_f1"] >= a["current_valid_f1"] for a in found]
                f1 = np.array([followed(a, "f1") for a in found])
                ap = np.array([followed(a, "average_precision") for a in found])
                every = np.array([a["candidate_valid_f1"] for a in found])
                rows.append(
                    [
                        name,
                        budget,
                        strategy,
                        len(found),
                        sum(better),
                        " / ".join(str(sum(a["adopts"][rule] for a in found)) for rule in RULES),
                        " / ".join(
                            str(sum(a["adopts"][rule] == b for a, b in zip(found, better, strict=True)))
                            for rule in RULES
                        ),
                        "{:.3f} ± {:.3f}".format(*common.interval(f1)),
                        "{:.3f} ± {:.3f}".format(*common.interval(ap)),
                        "{:+.3f} ± {:.3f}".format(*common.interval(ap - f1)),
                        "{:+.3f} ± {:.3f}".format(*common.interval(every - f1)),
                    ]
                )
    return common.markdown_table(headers, rows)
