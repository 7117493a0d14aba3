"""How an index chooses its FAISS structure: exact (``IndexFlatIP``) while small, from
``IndexPolicy.approximate_above`` vectors an inverted file (``IndexIVFFlat`` with about sqrt(n) lists, ``nprobe``
of them searched); float32 or float16 storage. docs/performance.md measures the choice and its recall."""

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
    nprobe: int = 32
    storage: str = "float32"  # or float16: half the memory, scalar-quantised vectors

    @classmethod
    def from_settings(cls, settings: Any) -> IndexPolicy:
        return cls(
            kind=settings.index_kind,
            approximate_above=settings.index_approximate_above,
            nprobe=settings.index_nprobe,
            storage=settings.index_storage,
        )

    def with_options(self, options: dict[str, Any] | None) -> IndexPolicy:
        """This policy with a dataset's own options (``Dataset.index_options``) over it; unknown keys are ignored."""
        names = {field.name for field in fields(self)}
        return replace(self, **{k: v for k, v in (options or {}).items() if k in names and v is not None})

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


def nlist_for(size: int) -> int:
    """Inverted lists for ``size`` vectors: about sqrt(size), so a search scans nprobe * sqrt(size) vectors."""
    return int(np.clip(round(np.sqrt(max(size, 1))), 64, 65536))


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
    nlist = min(nlist_for(size), max(len(train) // 39, 1))
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
