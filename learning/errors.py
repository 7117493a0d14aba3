"""Learning's own errors; the API maps each to a status code (409 for both)."""

from __future__ import annotations


class LearningError(Exception):
    """Something a training job cannot do with the dataset as it stands."""


class TooFewLabels(LearningError):
    """The stored labels (of records that exist) hold too few matches or non-matches to train and judge on."""

    def __init__(self, dataset: str, matches: int, non_matches: int, need_matches: int, need_non_matches: int):
        super().__init__(
            f"Training needs at least {need_matches} matches and {need_non_matches} non-matches among the stored "
            f"labels of dataset {dataset!r}; it has {matches} and {non_matches}. Label more pairs "
            f"(GET /datasets/{dataset}/review suggests some) and try again."
        )
        self.matches, self.non_matches = matches, non_matches
        self.need_matches, self.need_non_matches = need_matches, need_non_matches


class JobUnfinished(LearningError):
    """Another training job of the dataset has not finished."""

    def __init__(self, dataset: str, job_id: str, status: str):
        super().__init__(
            f"Training job {job_id} of dataset {dataset!r} is still {status}; wait for it "
            f"(GET /datasets/{dataset}/train) or cancel it (DELETE /datasets/{dataset}/train)."
        )
        self.job_id, self.status = job_id, status
