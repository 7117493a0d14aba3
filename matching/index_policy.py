"""How an index chooses its FAISS structure: exact (``IndexFlatIP``) while small, from
``IndexPolicy.approximate_above`` vectors an inverted file (``IndexIVFFlat`` with about sqrt(n) lists, ``nprobe``
of them searched, raised at build time until a sample of the index's own vectors finds ``target_recall`` of its
exact neighbours); float32 or float16 storage. docs/performance.md measures the choice and its recall."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import faiss
import numpy as np

# Below this many vectors an inverted file has too few points per list to train well: always exact.
MIN_APPROXIMATE_SIZE = 4096
# An inverted file is retrained (new lists) once it holds this many times the vectors it was trained for.
RETRAIN_GROWTH = 4


@dataclass(frozen=True)
class IndexPolicy:
    """How an index chooses its FAISS structure: ``kind`` auto (exact while small), flat or ivf."""

    kind: str = "auto"
    approximate_above: int = 50_000
    nprobe: int = 32  # the fewest inverted lists a search visits
    storage: str = "float32"  # or float16: half the memory, scalar-quantised vectors
    target_recall: float = 0.0  # > 0: nprobe raised at build time until recall@10 on a sample reaches it
    lists_per_sqrt: float = 1.0  # an inverted file of n vectors has about lists_per_sqrt * sqrt(n) lists

    @classmethod
    def from_settings(cls, settings: Any) -> IndexPolicy:
        return cls(
            kind=settings.index_kind,
            approximate_above=settings.index_approximate_above,
            nprobe=settings.index_nprobe,
            storage=settings.index_storage,
            target_recall=settings.index_target_recall,
            lists_per_sqrt=settings.index_lists_per_sqrt,
        )

    def with_options(self, options: dict[str, Any] | None) -> IndexPolicy:
        """This policy with a dataset's own options (``Dataset.index_options``) over it; unknown keys are ignored.
        A dataset that names its ``nprobe`` gets exactly that many lists searched (no tuning)."""
        names = {field.name for field in fields(self)}
        chosen = {k: v for k, v in (options or {}).items() if k in names and v is not None}
        if "nprobe" in chosen:
            chosen.setdefault("target_recall", 0.0)
        return replace(self, **chosen)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def structure(self, size: int) -> str:
        """``flat`` or ``ivf`` for an index of ``size`` vectors."""
        if self.kind == "flat" or size < MIN_APPROXIMATE_SIZE:
            return "flat"
        if self.kind == "ivf" or size >= self.approximate_above:
            return "ivf"
        return "flat"


def storage_of(index: faiss.Index) -> str:
    """``float16`` when the FAISS index holds scalar-quantised (half precision) vectors, else ``float32``."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else faiss.downcast_index(index)
    return "float16" if isinstance(inner, faiss.IndexScalarQuantizer | faiss.IndexIVFScalarQuantizer) else "float32"


def nlist_for(size: int, lists_per_sqrt: float) -> int:
    """Inverted lists for ``size`` vectors: about ``lists_per_sqrt`` * sqrt(size). More lists make each list shorter,
    so a search at a given recall reads fewer vectors; training costs grow with the square of the list count."""
    return int(np.clip(round(lists_per_sqrt * np.sqrt(max(size, 1))), 64, 65536))


def new_faiss_index(
    dim: int, structure: str, policy: IndexPolicy, train: np.ndarray | None = None, size: int = 0
) -> faiss.Index:
    """An empty FAISS index labelled by record id; an inverted file for ``size`` vectors is trained on ``train``."""
    half = policy.storage == "float16"
    ip = faiss.METRIC_INNER_PRODUCT
    if structure == "flat":
        inner = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, ip) if half else faiss.IndexFlatIP(dim)
        return faiss.IndexIDMap(inner)
    assert train is not None, "an inverted file needs training vectors"
    nlist = min(nlist_for(size, policy.lists_per_sqrt), max(len(train) // 39, 1))
    quantizer = faiss.IndexFlatIP(dim)
    if half:
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16, ip, False)
    else:
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
    index.cp.niter = 10
    index.cp.max_points_per_centroid = 64
    index.cp.seed = 1234
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    index.nprobe = policy.nprobe
    return index


# nprobe values tried in turn when tuning toward a target recall; a search never visits more than half of the lists
# (beyond that, an exact index is the better structure).
NPROBE_LADDER = (8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192)
TUNING_QUERIES = 100
TUNING_K = 10


def tune_nprobe(
    index: faiss.IndexIVF, record_ids: np.ndarray, vectors: np.ndarray, policy: IndexPolicy
) -> tuple[int, float]:
    """(nprobe, recall@10): the fewest lists, from ``policy.nprobe`` up, whose search finds ``policy.target_recall``
    of the exact 10 nearest neighbours of 100 of the index's own vectors (each query's own vector left out); the
    most allowed, with its recall, when none does. ``vectors`` are those ``index`` holds, labelled ``record_ids``."""
    nlist = int(index.nlist)
    start = min(policy.nprobe, nlist)
    if policy.target_recall <= 0 or len(vectors) <= TUNING_K + 1:
        return start, float("nan")
    rows = np.sort(np.random.default_rng(1).choice(len(vectors), min(TUNING_QUERIES, len(vectors)), replace=False))
    queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    _, exact = faiss.knn(queries, vectors, TUNING_K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    truth = _without_self(record_ids[exact], record_ids[rows])
    tried = [start, *(p for p in NPROBE_LADDER if start < p <= max(start, nlist // 2))]
    recall = 0.0
    for nprobe in tried:
        index.nprobe = nprobe
        _, found = index.search(queries, TUNING_K + 1)
        recall = _overlap(_without_self(found, record_ids[rows]), truth)
        if recall >= policy.target_recall:
            break
    return int(index.nprobe), recall


def _without_self(ids: np.ndarray, own: np.ndarray) -> list[set[int]]:
    """Each row's first ``TUNING_K`` ids other than its own."""
    return [set([int(i) for i in row if i != me and i >= 0][:TUNING_K]) for row, me in zip(ids, own, strict=True)]


def _overlap(found: list[set[int]], truth: list[set[int]]) -> float:
    return float(np.mean([len(f & t) / max(len(t), 1) for f, t in zip(found, truth, strict=True)]))
