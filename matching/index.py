"""FAISS indexes, one per (dataset, source): inner product over L2-normalised vectors (= cosine).

A small index is exact (``IndexFlatIP``); from ``IndexPolicy.approximate_above`` vectors an inverted file
(``IndexIVFFlat`` with about sqrt(n) lists, ``nprobe`` of them searched) answers instead: docs/performance.md
measures the choice and its recall. FAISS holds the vectors with record ids as labels, and two sorted numpy
arrays map record ids to the embedding ids they hold: nothing per vector lives in a Python object.

The indexes are derived data. Their files are a start-up shortcut, trusted only when their sizes and checksums
match the manifest and their fingerprint (the (record id, embedding id) pairs they hold) equals the database's;
otherwise they are rebuilt from the stored vectors, with no encoder involved.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger("llmatch.index")

IndexKey = tuple[int, str]  # (dataset id, source)

FILE_FORMAT = 2
# Below this many vectors an inverted file has too few points per list to train well: always exact.
MIN_APPROXIMATE_SIZE = 4096
# An inverted file is retrained (new lists) once it holds this many times the vectors it was trained for.
RETRAIN_GROWTH = 4
# A GPU copy follows added records in place; entries made out of date (records replaced or removed) are left out
# of its answers and the records' current vectors searched beside it, until the copy is remade: at most once per
# GPU_REFRESH_SECONDS, or sooner once GPU_MAX_MASKED entries are out of date (each costs an extra result per search).
GPU_REFRESH_SECONDS = 30.0
GPU_MAX_MASKED = 1024
GPU_MAX_K = 2048  # the most results a FAISS GPU search returns per query


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@contextmanager
def single_threaded() -> Iterator[None]:
    """FAISS calls of this thread on one OpenMP thread: a single query gains little from two, and under
    concurrent requests or other load the threads' barriers cost several times the search itself."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # per calling thread (an OpenMP ICV): other threads keep theirs
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def fingerprint(pairs: Any, embedding_ids: np.ndarray | None = None) -> str:
    """Identity of an index's content: its (record id, embedding id) pairs in record id order.

    Takes either two arrays (record ids, embedding ids) or an iterable of pairs."""
    if embedding_ids is None:
        array = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
        record_ids, embedding_ids = array[:, 0], array[:, 1]
    else:
        record_ids = np.asarray(pairs, dtype=np.int64)
        embedding_ids = np.asarray(embedding_ids, dtype=np.int64)
        if record_ids.size > 1 and not bool(np.all(record_ids[1:] > record_ids[:-1])):
            order = np.argsort(record_ids, kind="stable")
            record_ids, embedding_ids = record_ids[order], embedding_ids[order]
    digest = hashlib.sha256(b"llmatch-index-v2")
    digest.update(np.stack([record_ids, embedding_ids], axis=1).astype("<i8").tobytes())
    return digest.hexdigest()


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


class GpuCopies:
    """Makes the GPU copy of a CPU index (FAISS, GPU 0); a collaborator, so that when copies are made can be tested
    on machines without a GPU."""

    def copy(self, cpu: faiss.Index) -> faiss.Index:
        return faiss.index_cpu_to_gpu(_gpu_resources(), 0, cpu)


class VectorIndex:
    """A mutable inner-product index keyed by record id, with an optional GPU copy for search."""

    def __init__(
        self, dim: int, use_gpu: bool = False, policy: IndexPolicy | None = None, gpu: GpuCopies | None = None
    ):
        self.dim = dim
        self.policy = policy or IndexPolicy()
        self.structure = "flat"
        self.trained_size = 0  # vectors an inverted file was built for
        self.cpu = new_faiss_index(dim, "flat", self.policy)
        self._record_ids = np.empty(0, dtype=np.int64)  # sorted
        self._embedding_ids = np.empty(0, dtype=np.int64)  # the embedding each record's vector came from
        self.version = 0  # bumped by every change, so a save knows what it wrote
        self._use_gpu = use_gpu
        self._gpu_copies = gpu or GpuCopies()
        self._gpu = None
        self._gpu_stale = True  # the GPU copy must be remade before the next search
        self._gpu_masked: set[int] = set()  # record ids whose entries in the GPU copy are out of date
        self._gpu_masked_since = 0.0  # time.monotonic() when the first of them went out of date
        self._gpu_delta = new_faiss_index(dim, "flat", IndexPolicy())  # current vectors of masked records
        self.gpu_refresh_seconds = GPU_REFRESH_SECONDS
        self._lock = threading.RLock()

    @classmethod
    def build(
        cls,
        record_ids: np.ndarray,
        embedding_ids: np.ndarray,
        vectors: np.ndarray,
        use_gpu: bool = False,
        policy: IndexPolicy | None = None,
    ) -> VectorIndex:
        """An index holding exactly these vectors, its structure chosen by their number."""
        index = cls(vectors.shape[1], use_gpu, policy)
        index._fill(*_last_per_record(record_ids, embedding_ids, vectors))
        return index

    @property
    def size(self) -> int:
        return int(self.cpu.ntotal)

    def upsert(self, record_ids: np.ndarray, embedding_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors, replacing those of records already present."""
        record_ids, embedding_ids, vectors = _last_per_record(record_ids, embedding_ids, vectors)
        with self._lock:
            positions = self._positions(record_ids)
            present = positions >= 0
            if present.any():
                self.cpu.remove_ids(faiss.IDSelectorBatch(record_ids[present]))
            self.cpu.add_with_ids(vectors, record_ids)
            self._gpu_upsert(record_ids, vectors, present)
            self._embedding_ids[positions[present]] = embedding_ids[present]
            new_ids, new_embedding_ids = record_ids[~present], embedding_ids[~present]
            order = np.argsort(new_ids)
            at = np.searchsorted(self._record_ids, new_ids[order])
            self._record_ids = np.insert(self._record_ids, at, new_ids[order])
            self._embedding_ids = np.insert(self._embedding_ids, at, new_embedding_ids[order])
            self._changed()
            if self._needs_restructure():
                self._restructure()

    def remove(self, record_ids: Iterable[int]) -> None:
        ids = np.unique(np.fromiter((int(i) for i in record_ids), dtype=np.int64))
        with self._lock:
            positions = self._positions(ids)
            positions = positions[positions >= 0]
            if positions.size == 0:
                return
            self.cpu.remove_ids(faiss.IDSelectorBatch(self._record_ids[positions]))
            self._gpu_out_of_date(self._record_ids[positions])
            self._record_ids = np.delete(self._record_ids, positions)
            self._embedding_ids = np.delete(self._embedding_ids, positions)
            self._changed()
            if self._needs_restructure():
                self._restructure()

    def set_policy(self, policy: IndexPolicy) -> bool:
        """Follow ``policy`` from now on: rebuilt at once when it wants another structure or storage for this size,
        else only its nprobe changes. Returns whether the FAISS structure was rebuilt."""
        with self._lock:
            if policy == self.policy:
                return False
            self.policy = policy
            if self.structure == "ivf":
                self.cpu.nprobe = policy.nprobe
                self._gpu_stale = True  # the GPU copy carries the old nprobe
            if policy.structure(self.size) != self.structure or storage_of(self.cpu) != policy.storage:
                self._restructure()
                return True
            return False

    def embedding_ids_of(self, record_ids: np.ndarray) -> np.ndarray:
        """The embedding id this index holds for each record id, -1 where it holds none."""
        ids = np.asarray(record_ids, dtype=np.int64)
        with self._lock:
            if self._record_ids.size == 0:
                return np.full(ids.shape, -1, dtype=np.int64)
            positions = self._positions(ids)
            return np.where(positions >= 0, self._embedding_ids[np.maximum(positions, 0)], -1)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, record ids) per query row; missing slots have id -1."""
        with self._lock, single_threaded():
            queries = np.ascontiguousarray(vectors, dtype=np.float32)
            k = min(k, max(self.size, 1))
            gpu = self._search_index(k)
            if gpu is self.cpu:
                return self.cpu.search(queries, k)
            return self._search_gpu(gpu, queries, k)

    def fingerprint(self) -> str:
        with self._lock:
            return fingerprint(self._record_ids, self._embedding_ids)

    def record_ids(self) -> np.ndarray:
        """The record ids this index holds, sorted (a copy)."""
        with self._lock:
            return self._record_ids.copy()

    def _positions(self, record_ids: np.ndarray) -> np.ndarray:
        """Each record id's position in the sorted id arrays, -1 where absent."""
        if self._record_ids.size == 0:
            return np.full(len(record_ids), -1, dtype=np.int64)
        at = np.searchsorted(self._record_ids, record_ids)
        clipped = np.minimum(at, self._record_ids.size - 1)
        return np.where(self._record_ids[clipped] == record_ids, clipped, -1)

    def _changed(self) -> None:
        self.version += 1

    def _fill(self, record_ids: np.ndarray, embedding_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the whole content: a new FAISS structure chosen by size, trained on a sample when approximate."""
        if record_ids.size > 1 and not bool(np.all(record_ids[1:] > record_ids[:-1])):
            order = np.argsort(record_ids, kind="stable")
            record_ids, embedding_ids, vectors = record_ids[order], embedding_ids[order], vectors[order]
        structure = self.policy.structure(len(record_ids))
        train = None
        if structure == "ivf":
            sample = min(len(record_ids), nlist_for(len(record_ids)) * 64)
            train = vectors[np.sort(np.random.default_rng(0).choice(len(record_ids), sample, replace=False))]
        index = new_faiss_index(self.dim, structure, self.policy, train, len(record_ids))
        for start in range(0, len(record_ids), 65_536):
            part = slice(start, start + 65_536)
            index.add_with_ids(np.ascontiguousarray(vectors[part], dtype=np.float32), record_ids[part])
        with self._lock:
            self.cpu, self.structure = index, structure
            self.trained_size = len(record_ids) if structure == "ivf" else 0
            self._record_ids, self._embedding_ids = record_ids, embedding_ids
            self._gpu_stale = True  # a new structure: copied anew
            self._changed()

    def _needs_restructure(self) -> bool:
        wanted = self.policy.structure(self.size)
        if self.structure == "flat":
            return wanted == "ivf"
        if wanted == "flat":  # hysteresis: back to exact only well below the threshold
            floor = max(self.policy.approximate_above // 2, MIN_APPROXIMATE_SIZE)
            return self.policy.kind != "auto" or self.size < floor
        return self.size > RETRAIN_GROWTH * self.trained_size

    def _restructure(self) -> None:
        """Rebuild the FAISS structure from the vectors this index holds (no database, no encoder)."""
        started = time.perf_counter()
        before = self.structure
        self._fill(self._record_ids, self._embedding_ids, self._vectors())
        log.info(
            "index of %d vectors rebuilt as %s (was %s) in %.2fs",
            self.size,
            self.structure,
            before,
            time.perf_counter() - started,
        )

    def _vectors(self) -> np.ndarray:
        """The stored vectors in record id order."""
        if self.structure == "flat":
            labels = faiss.vector_to_array(self.cpu.id_map)
            vectors = self.cpu.index.reconstruct_n(0, self.size)
            return vectors[np.argsort(labels, kind="stable")]
        self.cpu.set_direct_map_type(faiss.DirectMap.Hashtable)
        try:
            return self.cpu.reconstruct_batch(self._record_ids)
        finally:
            self.cpu.set_direct_map_type(faiss.DirectMap.NoMap)

    def _search_index(self, k: int) -> faiss.Index:
        """The index to search: the CPU one, or the GPU copy, remade first when stale or due (``_gpu_due``)."""
        if not self._use_gpu:
            return self.cpu
        if self._gpu_stale or self._gpu_due(k):
            try:
                self._gpu = self._gpu_copies.copy(self.cpu)
            except RuntimeError as error:  # a structure this FAISS build cannot move to the GPU
                log.warning("searching a %s index on the CPU: %s", self.structure, error)
                self._use_gpu = False
                return self.cpu
            self._gpu_stale = False
            self._gpu_masked.clear()
            self._gpu_delta.reset()
        return self._gpu

    def _gpu_due(self, k: int) -> bool:
        """Whether the GPU copy's out-of-date entries call for a new copy now."""
        masked = len(self._gpu_masked)
        if not masked:
            return False
        too_many = masked > GPU_MAX_MASKED or k + masked > GPU_MAX_K
        return too_many or time.monotonic() - self._gpu_masked_since >= self.gpu_refresh_seconds

    def _gpu_upsert(self, record_ids: np.ndarray, vectors: np.ndarray, present: np.ndarray) -> None:
        """Follow an upsert on the GPU copy: records it never held are added to it; the others' entries are out
        of date, and their new vectors are searched beside it."""
        if self._gpu is None or self._gpu_stale:
            return
        masked = np.fromiter(self._gpu_masked, dtype=np.int64, count=len(self._gpu_masked))
        fresh = ~present & ~np.isin(record_ids, masked)
        if fresh.any():
            self._gpu.add_with_ids(vectors[fresh], record_ids[fresh])
        if (~fresh).any():
            self._gpu_out_of_date(record_ids[~fresh])
            self._gpu_delta.add_with_ids(vectors[~fresh], record_ids[~fresh])

    def _gpu_out_of_date(self, record_ids: np.ndarray) -> None:
        """The GPU copy's entries of these records no longer count (nor their vectors searched beside it)."""
        if self._gpu is None or self._gpu_stale or record_ids.size == 0:
            return
        if not self._gpu_masked:
            self._gpu_masked_since = time.monotonic()
        self._gpu_masked.update(int(i) for i in record_ids)
        self._gpu_delta.remove_ids(faiss.IDSelectorBatch(np.asarray(record_ids, dtype=np.int64)))

    def _search_gpu(self, gpu: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search the GPU copy for ``k`` more results than it has out-of-date entries, leave those out, and merge
        in the current vectors of the records they belonged to."""
        if not self._gpu_masked:
            return gpu.search(queries, k)
        masked = np.fromiter(self._gpu_masked, dtype=np.int64, count=len(self._gpu_masked))
        scores, ids = gpu.search(queries, k + masked.size)
        ids = np.where(np.isin(ids, masked), -1, ids)
        if self._gpu_delta.ntotal:
            more_scores, more_ids = self._gpu_delta.search(queries, min(k, self._gpu_delta.ntotal))
            scores, ids = np.hstack([scores, more_scores]), np.hstack([ids, more_ids])
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, best, axis=1), np.take_along_axis(ids, best, axis=1)

    def save(self, path: Path, meta: dict) -> None:
        """Write the index files under names private to this process, fsynced, then commit them by renaming the
        manifest (``path`` with suffix .json) over the old one; the files it replaced are deleted."""
        directory = path.parent
        directory.mkdir(parents=True, exist_ok=True)
        stem = path.name.removesuffix(".faiss")
        generation = f"{os.getpid()}-{secrets.token_hex(4)}"
        index_file = directory / f"{stem}.{generation}.faiss"
        ids_file = directory / f"{stem}.{generation}.ids.npy"
        with self._lock:
            faiss.write_index(self.cpu, str(index_file))
            ids = np.stack([self._record_ids, self._embedding_ids])
            manifest = {
                **meta,
                "format": FILE_FORMAT,
                "dim": self.dim,
                "structure": self.structure,
                "trained_size": self.trained_size,
                "size": self.size,
                "fingerprint": self.fingerprint(),
            }
        with ids_file.open("wb") as handle:
            np.save(handle, ids, allow_pickle=False)
        for name, file in (("index", index_file), ("ids", ids_file)):
            _fsync(file)
            manifest[f"{name}_file"] = file.name
            manifest[f"{name}_bytes"], manifest[f"{name}_crc32"] = _size_and_crc(file)
        manifest_path = path.with_suffix(".json")
        replaced = _data_files(manifest_path)
        _write_atomically(manifest_path, json.dumps(manifest).encode())
        for file in replaced - {index_file, ids_file}:
            file.unlink(missing_ok=True)
        _remove_orphans(directory, stem)

    @classmethod
    def load(
        cls, path: Path, expected_fingerprint: str, use_gpu: bool = False, policy: IndexPolicy | None = None
    ) -> VectorIndex | None:
        """The saved index, or None when it is missing, damaged or not the database's content."""
        if not path.with_suffix(".json").exists():
            log.info("no index file %s yet: building it", path.with_suffix(".json").name)
            return None
        try:
            manifest = json.loads(path.with_suffix(".json").read_text())
            if manifest.get("format") != FILE_FORMAT or manifest["fingerprint"] != expected_fingerprint:
                return None
            files = {}
            for name in ("index", "ids"):
                file = path.parent / manifest[f"{name}_file"]
                if _size_and_crc(file) != (manifest[f"{name}_bytes"], manifest[f"{name}_crc32"]):
                    raise ValueError(f"{file.name} does not match its manifest (truncated or overwritten)")
                files[name] = file
            ids = np.load(files["ids"], allow_pickle=False)
            cpu = faiss.read_index(str(files["index"]))
            if ids.shape != (2, manifest["size"]) or cpu.ntotal != manifest["size"] or cpu.d != manifest["dim"]:
                raise ValueError("index and id files disagree")
            if fingerprint(ids[0], ids[1]) != expected_fingerprint:
                return None
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            log.warning("index file %s unusable (%s): rebuilding", path, error)
            return None
        index = cls(int(manifest["dim"]), use_gpu, policy)
        index.cpu, index.structure = cpu, manifest["structure"]
        index.trained_size = int(manifest["trained_size"])
        index._record_ids, index._embedding_ids = ids[0].astype(np.int64), ids[1].astype(np.int64)
        if index.structure == "ivf":
            index.cpu.nprobe = index.policy.nprobe
        # Files saved under another policy (e.g. before a dataset's options changed): rebuilt to this one.
        if storage_of(index.cpu) != index.policy.storage or index._needs_restructure():
            index._restructure()
        return index

    @staticmethod
    def delete_files(path: Path) -> None:
        """Remove an index's manifest and the files it names."""
        manifest_path = path.with_suffix(".json")
        for file in _data_files(manifest_path):
            file.unlink(missing_ok=True)
        manifest_path.unlink(missing_ok=True)
        path.unlink(missing_ok=True)  # a file of the earlier single-file format


def _last_per_record(
    record_ids: np.ndarray, embedding_ids: np.ndarray, vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batch with one row per record id: its last."""
    record_ids = np.asarray(record_ids, dtype=np.int64)
    embedding_ids = np.asarray(embedding_ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    unique, last_reversed = np.unique(record_ids[::-1], return_index=True)
    if unique.size == record_ids.size:
        return record_ids, embedding_ids, vectors
    rows = np.sort(record_ids.size - 1 - last_reversed)
    return record_ids[rows], embedding_ids[rows], vectors[rows]


def _size_and_crc(file: Path) -> tuple[int, int]:
    crc = 0
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return file.stat().st_size, crc


def _fsync(file: Path) -> None:
    with file.open("rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a name private to this process, fsync, rename over ``path``, fsync the directory."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    _fsync_directory(path.parent)


def _data_files(manifest_path: Path) -> set[Path]:
    """The data files a manifest names (none when it is missing or unreadable)."""
    try:
        manifest = json.loads(manifest_path.read_text())
        return {manifest_path.parent / manifest[f"{name}_file"] for name in ("index", "ids")}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _remove_orphans(directory: Path, stem: str) -> None:
    """Delete data files of ``stem`` left by processes that died before committing them."""
    pattern = re.compile(rf"{re.escape(stem)}(?:\.json)?\.(\d+)-[0-9a-f]+\.(?:faiss|ids\.npy|tmp)")
    keep = _data_files(directory / f"{stem}.json")
    for file in directory.glob(f"{glob.escape(stem)}.*"):
        match = pattern.fullmatch(file.name)
        if match and file not in keep and not _process_alive(int(match.group(1))):
            file.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own uncommitted files are never in use between saves
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_GPU_RESOURCES = None


def _gpu_resources():
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


@dataclass(frozen=True)
class SearchHit:
    record_id: int
    score: float


class IndexRegistry:
    """Every loaded index of this process, keyed by (dataset id, source)."""

    def __init__(self, directory: Path, use_gpu: bool = False, policy: IndexPolicy | None = None):
        self.directory = directory
        self.use_gpu = use_gpu
        self.policy = policy or IndexPolicy()
        self.dataset_policies: dict[int, IndexPolicy] = {}  # per dataset id, where one overrides ``policy``
        self._indexes: dict[IndexKey, VectorIndex] = {}
        self._saved: dict[IndexKey, tuple[int, float]] = {}  # version written and when (monotonic)
        self._lock = threading.RLock()
        self._save_lock = threading.Lock()
        self.loaded = False

    def path(self, key: IndexKey) -> Path:
        dataset_id, source = key
        return self.directory / f"{dataset_id}-{source}.faiss"

    def policy_for(self, key: IndexKey) -> IndexPolicy:
        return self.dataset_policies.get(key[0], self.policy)

    def set_policy(self, dataset_id: int, policy: IndexPolicy | None) -> list[IndexKey]:
        """Use ``policy`` for the dataset's indexes (None: the process's policy); its loaded indexes switch to it
        at once. Returns the keys of the indexes whose FAISS structure was rebuilt."""
        with self._lock:
            if policy is None or policy == self.policy:
                self.dataset_policies.pop(dataset_id, None)
            else:
                self.dataset_policies[dataset_id] = policy
            effective = self.policy_for((dataset_id, ""))
            loaded = [(key, index) for key, index in self._indexes.items() if key[0] == dataset_id]
        rebuilt = [key for key, index in loaded if index.set_policy(effective)]
        if rebuilt:
            log.info("dataset %d now indexed with %s", dataset_id, effective)
        return rebuilt

    def forget_policies(self, keep: set[int]) -> None:
        """Drop the policies of datasets not in ``keep`` (deleted ones)."""
        with self._lock:
            for dataset_id in set(self.dataset_policies) - keep:
                del self.dataset_policies[dataset_id]

    def get(self, key: IndexKey) -> VectorIndex | None:
        with self._lock:
            return self._indexes.get(key)

    def put(self, key: IndexKey, index: VectorIndex, saved: bool = False) -> None:
        """Hold ``index`` for ``key``; ``saved`` when its files already hold exactly this content."""
        with self._lock:
            self._indexes[key] = index
            if saved:
                self._saved[key] = (index.version, time.monotonic())
            else:
                self._saved.pop(key, None)

    def keys(self) -> list[IndexKey]:
        with self._lock:
            return list(self._indexes)

    def size(self, key: IndexKey) -> int:
        """Vectors the index of ``key`` holds (0 when none is loaded)."""
        index = self.get(key)
        return 0 if index is None else index.size

    def record_ids(self, key: IndexKey) -> np.ndarray:
        """The record ids the index of ``key`` holds, sorted (empty when none is loaded)."""
        index = self.get(key)
        return np.empty(0, dtype=np.int64) if index is None else index.record_ids()

    def upsert(self, key: IndexKey, record_ids: np.ndarray, embedding_ids: np.ndarray, vectors: np.ndarray) -> None:
        with self._lock:
            index = self._indexes.get(key)
            if index is None or index.dim != vectors.shape[1]:
                index = self._indexes[key] = VectorIndex(vectors.shape[1], self.use_gpu, self.policy_for(key))
            index.upsert(record_ids, embedding_ids, vectors)

    def remove(self, key: IndexKey, record_ids: Iterable[int]) -> None:
        index = self.get(key)
        if index is not None:
            index.remove(record_ids)

    def embedding_ids(self, key: IndexKey, record_ids: np.ndarray) -> np.ndarray:
        """The embedding id the index holds for each record id, -1 where it holds none (e.g. to drop stale hits)."""
        index = self.get(key)
        if index is None:
            return np.full(len(record_ids), -1, dtype=np.int64)
        return index.embedding_ids_of(record_ids)

    def drop_dataset(self, dataset_id: int) -> None:
        with self._save_lock, self._lock:
            self.dataset_policies.pop(dataset_id, None)
            for key in [k for k in self._indexes if k[0] == dataset_id]:
                del self._indexes[key]
                self._saved.pop(key, None)
                VectorIndex.delete_files(self.path(key))

    def search(self, key: IndexKey, vector: np.ndarray, k: int) -> list[SearchHit]:
        index = self.get(key)
        if index is None or index.size == 0:
            return []
        scores, ids = index.search(vector.reshape(1, -1), k)
        return [SearchHit(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]

    def save(self, key: IndexKey) -> None:
        """Write one index's files now."""
        with self._save_lock:
            index = self.get(key)
            if index is None:
                return
            version = index.version
            index.save(self.path(key), {"dataset_id": key[0], "source": key[1]})
            with self._lock:
                if self._indexes.get(key) is index:
                    self._saved[key] = (version, time.monotonic())

    def save_all(self) -> None:
        for key in self.keys():
            self.save(key)

    def save_changed(self, min_interval: float = 0.0) -> list[IndexKey]:
        """Save every index changed since its files were written, each at most once per ``min_interval`` seconds."""
        saved = []
        now = time.monotonic()
        for key in self.keys():
            index = self.get(key)
            version, when = self._saved.get(key, (-1, float("-inf")))
            if index is not None and index.version != version and now - when >= min_interval:
                self.save(key)
                saved.append(key)
        return saved
