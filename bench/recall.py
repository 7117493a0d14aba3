"""Index recall on data that is not shaped like the index: recall@10 against exact search, one-query latency,
build rate and bytes per vector of the service's inverted file (its own ``nlist_for``, at each ``--lists-per-sqrt``
and ``--storage``) over a sweep of ``nprobe``, and of HNSW32 over a sweep of ``efSearch``.

    python -m bench.recall                                     # all sets below
    python -m bench.recall --sets real skewed:100000           # some of them
    python -m bench.recall --sets skewed:1000000 --lists-per-sqrt 1 2 --storage float16   # list counts compared

A set is ``real`` (MiniLM vectors of every record of the shared tables, cached in ``bench/out``) or
``SPACE:SIZE`` with a space of ``bench.scale.SPACES``. Queries are held aside from the same data: ``--queries``
random rows (so near-duplicates of a query can be in the base, as matching records are). Latency is one query
at a time on one FAISS thread, as the service searches; builds use every thread, as the service's start-up does.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.scale import REAL_CACHE, SPACES, config, exact_top, faiss_bytes, recall_at, row, time_queries  # noqa: E402
from bench.vectors import real_vectors  # noqa: E402
from matching.index import VectorIndex  # noqa: E402
from matching.index_policy import IndexPolicy  # noqa: E402

HEADERS = ["data", "vectors", "structure", "build (vectors/s)", "bytes/vector", "p50 ms", "p99 ms", "CPU ms/query",
           "recall@10"]  # fmt: skip


def timed(search: Callable, queries: np.ndarray, truth: np.ndarray | None) -> tuple[dict, float, float]:
    """Wall latency per query, recall against ``truth`` (None: exact, 1 by construction), and this thread's CPU
    milliseconds per query (which other processes' load on the machine changes far less than wall time)."""
    began = time.thread_time()
    latency, found = time_queries(search, queries)
    cpu_ms = (time.thread_time() - began) * 1000 / (len(queries) + 10)  # time_queries warms up on 10 more
    return latency, 1.0 if truth is None else recall_at(found, truth), cpu_ms


def held_aside(vectors: np.ndarray, queries: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``queries`` random rows as queries, the others as the base (both contiguous)."""
    order = np.random.default_rng(seed).permutation(len(vectors))
    return np.ascontiguousarray(vectors[order[queries:]]), np.ascontiguousarray(vectors[order[:queries]])


def load_set(name: str, queries: int) -> tuple[str, np.ndarray, np.ndarray]:
    """A set's label, base and queries: ``real`` or ``SPACE:SIZE`` (SIZE vectors in the base)."""
    if name == "real":
        return "MiniLM (real)", *held_aside(real_vectors(REAL_CACHE), queries)
    space, size = name.split(":")
    return space, *held_aside(SPACES[space].array(int(size) + queries, seed=1), queries)


def measure_exact(label: str, base: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
    """The exact index the service keeps while small, timed on at most 100 queries (recall 1 by construction)."""
    ids = np.arange(len(base), dtype=np.int64)
    began = time.perf_counter()
    exact = VectorIndex.build(ids, ids, base, policy=IndexPolicy(kind="flat"))
    build = time.perf_counter() - began
    latency, recall, cpu_ms = timed(lambda q: exact.search(q, 10)[1], queries[:100], None)
    entry = row(label, len(base), "exact (IndexFlatIP)", build, faiss_bytes(exact.cpu), latency, recall)
    return entry | {"cpu_ms_per_query": cpu_ms}


def measure_ivf(
    label: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, nprobes: Sequence[int], policy: IndexPolicy
) -> list[dict[str, Any]]:
    """The service's inverted file under ``policy`` (forced, whatever the size) at each ``nprobe``."""
    ids = np.arange(len(base), dtype=np.int64)
    began = time.perf_counter()
    ivf = VectorIndex.build(ids, ids, base, policy=replace(policy, kind="ivf"))
    build = time.perf_counter() - began
    if ivf.structure != "ivf":  # too few vectors to train lists: the service keeps it exact
        return []
    size, nlist, rows = faiss_bytes(ivf.cpu), ivf.cpu.nlist, []
    codes = "Flat" if policy.storage == "float32" else "SQfp16"
    for nprobe in (p for p in nprobes if p <= nlist):
        ivf.cpu.nprobe = nprobe
        latency, recall, cpu_ms = timed(lambda q: ivf.search(q, 10)[1], queries, truth)
        entry = row(label, len(base), f"IVF{nlist},{codes} nprobe={nprobe}", build, size, latency, recall)
        rows.append(entry | {"cpu_ms_per_query": cpu_ms, "nprobe": nprobe, "nlist": nlist, **asdict(policy)})
    return rows


def measure_hnsw(
    label: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, efs: Sequence[int]
) -> list[dict[str, Any]]:
    """HNSW32 (efConstruction 40, the FAISS default) at each ``efSearch``."""
    graph = faiss.IndexHNSWFlat(base.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    began = time.perf_counter()
    graph.add(base)
    build = time.perf_counter() - began
    size, rows = faiss_bytes(graph), []
    for ef in efs:
        graph.hnsw.efSearch = ef
        latency, recall, cpu_ms = timed(lambda q: graph.search(q, 10)[1], queries, truth)
        entry = row(label, len(base), f"HNSW32 efSearch={ef}", build, size, latency, recall)
        rows.append(entry | {"cpu_ms_per_query": cpu_ms, "ef_search": ef})
    return rows


def measure_set(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Exact, IVF and (up to ``--hnsw-max`` vectors) HNSW rows for one set."""
    label, base, queries = load_set(name, args.queries)
    print(f"{label}: {len(base):,} vectors, {len(queries):,} queries", flush=True)
    truth = exact_top(base, queries, 10)
    rows = [measure_exact(label, base, queries)] if len(base) <= args.exact_max else []
    for per_sqrt in args.lists_per_sqrt:
        for storage in args.storage:
            policy = IndexPolicy(lists_per_sqrt=per_sqrt, storage=storage)
            rows += measure_ivf(label, base, queries, truth, args.nprobe, policy)
    if len(base) <= args.hnsw_max:
        rows += measure_hnsw(label, base, queries, truth, args.ef_search)
    for entry in rows:
        print(common.markdown_table(HEADERS, table_rows([entry])).splitlines()[-1], flush=True)
    return rows


def table_rows(rows: Sequence[dict]) -> list[list[Any]]:
    return [
        [r["data"], r["vectors"], r["structure"], round(r["build_vectors_per_s"]), round(r["bytes_per_vector"]),
         r["p50_ms"], r["p99_ms"], r["cpu_ms_per_query"], r["recall_at_10"]]
        for r in rows
    ]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument(
        "--sets", nargs="+", default=["real", "skewed:100000", "skewed:1000000", "diffuse:100000", "clustered:100000"]
    )
    parser.add_argument("--queries", type=int, default=1000, help="held-aside queries per set")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument(
        "--lists-per-sqrt", type=float, nargs="+", default=[IndexPolicy().lists_per_sqrt], help="lists/sqrt(n)"
    )
    parser.add_argument("--storage", nargs="+", choices=("float32", "float16"), default=["float32"])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest base HNSW is built for")
    parser.add_argument("--exact-max", type=int, default=1_000_000, help="largest base the exact index is timed on")
    parser.add_argument("--out", type=Path, default=common.default_out("recall"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [entry for name in args.sets for entry in measure_set(name, args)]
    report = {"config": config(args), "machine": common.machine(), "faiss_threads": faiss.omp_get_max_threads(),
              "rows": rows}  # fmt: skip
    common.publish(args.out, report, common.markdown_table(HEADERS, table_rows(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
