"""How records become entities: guarded single linkage over links at or above a threshold.

A link is a pair where one record is among the other's ``k`` candidates with a score at or above the
threshold. Plain connected components over links chain unrelated records together (a ~ b ~ c with a and c
unlike), so a merge must pass a guard: ``support`` asks that a share of the pairs across the two groups
score at or above the threshold, ``centroid`` that the groups' mean vectors do, ``none`` is plain components;
``max_size`` caps any of them. Links are merged best first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from llmatch.settings import Settings

GuardKind = Literal["none", "support", "centroid"]


@dataclass(frozen=True)
class Guard:
    """What two groups of records must show to become one entity."""

    kind: GuardKind = "support"
    min_support: float = 0.5
    max_size: int = 3  # 0: no cap

    @classmethod
    def from_settings(cls, settings: Settings) -> Guard:
        return cls(settings.entity_guard, settings.entity_min_support, settings.entity_max_size)

    def allows(self, left: np.ndarray, right: np.ndarray, threshold: float) -> bool:
        """May groups with these member vectors (rows) merge?"""
        if self.max_size and len(left) + len(right) > self.max_size:
            return False
        if self.kind == "support":
            return float(np.mean(left @ right.T >= threshold)) >= self.min_support
        if self.kind == "centroid":
            a, b = left.mean(axis=0), right.mean(axis=0)
            return float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12) >= threshold
        return True


def group(
    vectors: np.ndarray, links: Iterable[tuple[float, int, int]], threshold: float, guard: Guard
) -> list[list[int]]:
    """Rows grouped by guarded single linkage: links at or above the threshold, best first, merge two groups
    when the guard allows. Every row is in exactly one group."""
    root = list(range(len(vectors)))
    members: dict[int, list[int]] = {i: [i] for i in range(len(vectors))}

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for score, i, j in sorted(links, key=lambda link: (-link[0], link[1], link[2])):
        a, b = find(i), find(j)
        if score < threshold or a == b:
            continue
        if guard.allows(vectors[members[a]], vectors[members[b]], threshold):
            keep, gone = min(a, b), max(a, b)
            root[gone] = keep
            members[keep] += members.pop(gone)
    return list(members.values())


@dataclass(frozen=True)
class Grouping:
    """How a dataset's entities are formed."""

    guard: Guard
    k: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Grouping:
        return cls(Guard.from_settings(settings), settings.entity_candidates)
