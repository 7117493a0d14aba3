"""Compare the score-to-probability mappings on evaluations: each fitted on valid, its error reported on test.

Usage: python -m evaluation.mappings EVAL_DIR...   (folders written by `llmatch evaluate --out`)

For each folder, Platt scaling and isotonic regression are fitted on the scores of ``valid_pairs.csv`` (the
pairs the service calibrates on) and applied to the scores of ``test_pairs.csv``; the table gives each one's
expected calibration error and Brier score on test, and which one the service's own choice (cross-validated
on the valid pairs, ``service/calibration.py``) keeps. The last column is the noise floor of the ECE on that
many test pairs: its mean when the labels are drawn from the kept mapping's own probabilities (a perfectly
calibrated mapping, ``DRAWS`` draws); next to the Brier scores, that of a mapping that gives every pair
valid's match rate (no information). Test is only reported: nothing here is chosen on it.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from matching.calibration import (
    CALIBRATION_BINS,
    brier_score,
    expected_calibration_error,
    fit_isotonic,
    fit_platt,
    fit_probability,
    probabilities,
)

DRAWS = 1000  # label draws of the noise-floor column


def read_scores(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return np.array([float(r["score"]) for r in rows]), np.array([int(r["label"]) for r in rows])


def compare(folder: Path) -> dict[str, object]:
    """Test ECE and Brier score of each mapping fitted on the folder's valid pairs."""
    valid, test = read_scores(folder / "valid_pairs.csv"), read_scores(folder / "test_pairs.csv")
    chosen = fit_probability(*valid)
    row: dict[str, object] = {"evaluation": folder.name, "chosen": chosen["method"], "pairs": len(test[1])}
    for name, mapping in (("platt", fit_platt(*valid)), ("isotonic", fit_isotonic(*valid))):
        predicted = probabilities(mapping, test[0])
        row[name] = (expected_calibration_error(predicted, test[1]), brier_score(predicted, test[1]))
    kept = probabilities(chosen, test[0])
    rng = np.random.default_rng(0)
    draws = [expected_calibration_error(kept, (rng.uniform(size=kept.size) < kept).astype(int)) for _ in range(DRAWS)]
    row["floor"] = float(np.mean(draws))
    row["base_rate_brier"] = brier_score(np.full(test[1].size, valid[1].mean()), test[1])
    return row


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| evaluation | Platt: test ECE | Platt: test Brier | isotonic: test ECE | isotonic: test Brier "
        "| kept (cross-validated on valid) | test pairs | ECE if perfectly calibrated | Brier of valid's match rate |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        (platt_ece, platt_brier), (iso_ece, iso_brier) = row["platt"], row["isotonic"]
        lines.append(
            f"| {row['evaluation']} | {platt_ece:.3f} | {platt_brier:.3f} | {iso_ece:.3f} | {iso_brier:.3f} "
            f"| {row['chosen']} | {row['pairs']:,} | {row['floor']:.3f} | {row['base_rate_brier']:.3f} |"
        )
    return "\n".join(lines) + f"\n\nECE over {CALIBRATION_BINS} equal-width probability bins.\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.mappings", description=__doc__.splitlines()[0])
    parser.add_argument("eval_dirs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    for folder in args.eval_dirs:
        for split in ("valid", "test"):
            if not (folder / f"{split}_pairs.csv").is_file():
                parser.error(f"{folder} lacks {split}_pairs.csv: run `llmatch evaluate ... --out {folder}` first")
    print(markdown([compare(folder) for folder in args.eval_dirs]), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
