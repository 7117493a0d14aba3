"""Whether a trained version serves: its best-threshold F1 on the held-out labels against the current encoder's
on the same pairs (those whose two records the current encoder has vectors for). Both encoders' average precision
on those pairs is reported beside it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import average_precision_score
from sqlalchemy.orm import Session

from learning.labels import StoredLabel
from matching.calibration import ThresholdChoice, best_f1_threshold
from matching.pairs import load_encoded


@dataclass(frozen=True)
class Verdict:
    adopted: bool
    reason: str
    pairs: int
    matches: int
    candidate: ThresholdChoice
    current: ThresholdChoice
    candidate_average_precision: float = 0.0
    current_average_precision: float = 0.0

    def as_metrics(self) -> dict:
        return {
            "holdout_pairs": self.pairs,
            "holdout_matches": self.matches,
            "candidate": _rounded(asdict(self.candidate)),
            "current": _rounded(asdict(self.current)),
            "candidate_average_precision": round(self.candidate_average_precision, 4),
            "current_average_precision": round(self.current_average_precision, 4),
            "reason": self.reason,
        }


def served_vectors(session: Session, dataset_id: int, labels: Sequence[StoredLabel]) -> dict[int, np.ndarray]:
    """Record id -> the vector the dataset serves now, for the encoded records these labels name."""
    records = load_encoded(session, dataset_id, {r for x in labels for r in (x.left_record, x.right_record)})
    return dict(zip(records.ids.tolist(), records.vectors, strict=True))


def pair_scores(labels: Sequence[StoredLabel], vectors: dict[int, np.ndarray]) -> np.ndarray:
    return np.array([float(vectors[x.left_record] @ vectors[x.right_record]) for x in labels], dtype=np.float64)


def judge(labels: Sequence[StoredLabel], current: dict[int, np.ndarray], candidate: dict[int, np.ndarray]) -> Verdict:
    """Compare on the held-out pairs both encoders have vectors for; the candidate serves unless it does worse."""
    shared = [x for x in labels if all(r in current and r in candidate for r in (x.left_record, x.right_record))]
    truth = np.array([x.label for x in shared], dtype=np.int64)
    if not shared or truth.sum() in (0, len(truth)):
        empty = ThresholdChoice(0.0, 0.0, 0.0, 0.0)
        return Verdict(
            False,
            "the held-out labels of encoded records lack a class; nothing to judge on",
            len(shared),
            int(truth.sum()),
            empty,
            empty,
        )
    new_scores, now_scores = pair_scores(shared, candidate), pair_scores(shared, current)
    new, now = best_f1_threshold(new_scores, truth), best_f1_threshold(now_scores, truth)
    adopted = new.f1 >= now.f1
    reason = (
        f"held-out F1 {new.f1:.3f} against {now.f1:.3f} for the current encoder on the same {len(shared)} pairs"
        + ("" if adopted else ": the new version does worse and is not adopted")
    )
    return Verdict(
        adopted,
        reason,
        len(shared),
        int(truth.sum()),
        new,
        now,
        float(average_precision_score(truth, new_scores)),
        float(average_precision_score(truth, now_scores)),
    )


def _rounded(values: dict) -> dict:
    return {key: round(float(value), 4) for key, value in values.items()}
