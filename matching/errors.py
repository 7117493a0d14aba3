"""The engine's own errors: the API maps each to a status code and a message of its own (``service/``)."""

from __future__ import annotations

from collections.abc import Sequence


class MatchingError(Exception):
    """Something the engine cannot do with what it was asked."""


class UnknownSource(MatchingError):
    """A search named a target source the dataset has no record in."""

    def __init__(self, source: str, known: Sequence[str]):
        super().__init__(f"no source {source!r}; known: {', '.join(known) or 'none'}")
        self.source = source
        self.known = list(known)


class IndexBehind(MatchingError):
    """This process's index of a dataset holds vectors of another encoder version than its queries (a switch to a
    new version is not applied here yet): searching it would compare vectors of different models."""


class IndexesNotLoaded(MatchingError):
    """The process's indexes are not loaded yet, so they cannot answer a search that must be complete."""
