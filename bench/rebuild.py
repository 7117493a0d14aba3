"""Index rebuild throughput: an index rebuilt from the stored vectors, as ``llmatch serve`` does at start-up when
it has no index files, timed stage by stage in process over a fresh SQLite (or PostgreSQL) store.

    python -m bench.rebuild --records 1000000     # read, train, add, write: seconds and vectors/s per stage

Stages: reading the (record id, embedding id, vector) rows (``index_sync.stored_vectors``), training the
inverted file on its sample, adding every vector, writing the index files (``IndexRegistry.save``). recall@10 of
the built index is measured against exact search (``IndexFlatIP``) over the same vectors, on queries from the
same synthetic space, so that a faster build that loses recall shows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.scale import SPACES, config, exact_top, recall_at, time_queries  # noqa: E402
from bench.vectors import store_vectors  # noqa: E402
from llmatch.db import make_engine  # noqa: E402
from llmatch.models import Record  # noqa: E402
from matching import index_sync  # noqa: E402
from matching.index import VectorIndex  # noqa: E402
from matching.index_policy import IndexPolicy  # noqa: E402
from matching.registry import IndexRegistry  # noqa: E402

KEY_SOURCE = "b"


def load() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` shows them."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


@contextmanager
def store(database_url: str | None, space: str, n: int) -> Iterator[tuple[Any, Path, float]]:
    """A migrated, fresh store holding ``n`` vectors of ``space`` as source b: (engine, data dir, seconds to store)."""
    with tempfile.TemporaryDirectory(prefix="llmatch-rebuild-") as tmp, common.fresh_database(database_url) as url:
        data_dir = Path(tmp)
        env = {**os.environ, "LLMATCH_DATA_DIR": str(data_dir)}
        if url:
            env["LLMATCH_DATABASE_URL"] = url
        subprocess.run([common.llmatch_command(), "migrate"], env=env, check=True, capture_output=True)
        engine = make_engine(url or f"sqlite:///{data_dir / 'llmatch.sqlite3'}")
        began = time.perf_counter()
        store_vectors(engine, "rebuild", KEY_SOURCE, SPACES[space].sample(n, seed=1))
        try:
            yield engine, data_dir, time.perf_counter() - began
        finally:
            engine.dispose()


def timed(action: Callable[[], Any]) -> tuple[Any, float]:
    began = time.perf_counter()
    result = action()
    return result, time.perf_counter() - began


def measure(args: argparse.Namespace, space: str) -> dict[str, Any]:
    """Every stage of one rebuild of ``args.records`` vectors of ``space``, and the built index's recall@10."""
    n = args.records
    policy = IndexPolicy(nprobe=args.nprobe, target_recall=args.target_recall)
    with store(args.database_url, space, n) as (engine, data_dir, store_s):
        print(f"{space}: stored {n:,} vectors in {store_s:.1f} s (load {load()})", flush=True)
        with Session(engine) as session:
            key = (session.scalar(select(Record.dataset_id).limit(1)), KEY_SOURCE)
            result: dict[str, Any] = {"space": space, "vectors": n, "store_s": store_s, "load_before": load()}
            (record_ids, embedding_ids, vectors), result["read_s"] = timed(
                lambda: index_sync.stored_vectors(session, key, n)
            )
        timings: dict[str, float] = {}
        index, result["build_s"] = timed(
            lambda: VectorIndex.build(record_ids, embedding_ids, vectors, policy=policy, timings=timings)
        )
        result.update(timings, structure=index.structure, nlist=getattr(index.cpu, "nlist", 0))
        result.update(nprobe=getattr(index.cpu, "nprobe", 0), target_recall=policy.target_recall)
        result.update(gflops(result, vectors.shape[1]))
        registry = IndexRegistry(data_dir / "indexes", policy=policy)
        registry.put(key, index)
        _, result["write_s"] = timed(lambda: registry.save(key))
        result["load_after"] = load()
        result["total_s"] = result["read_s"] + result["build_s"] + result["write_s"]
        result.update(quality(index, record_ids, vectors, space, args.queries))
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}, flush=True)
    return result


def quality(index: VectorIndex, record_ids: np.ndarray, vectors: np.ndarray, space: str, q: int) -> dict[str, Any]:
    """recall@10 against exact search over the same vectors, and one-query search latency."""
    queries = SPACES[space].array(q, seed=2)
    truth = exact_top(np.ascontiguousarray(vectors), queries, 10)
    latency, found = time_queries(lambda x: index.search(x, 10)[1], queries)
    positions = np.where(found >= 0, np.searchsorted(record_ids, found), -1)
    return {"recall_at_10": recall_at(positions, truth), "search_p50_ms": latency["p50_ms"]}


def gflops(result: dict[str, Any], dim: int) -> dict[str, float]:
    """Arithmetic rate of training (k-means: niter passes of the sample against every list) and of adding (each
    vector against every list): near the machine's matrix-multiply rate, those stages are bound by arithmetic."""
    n, nlist = result["vectors"], result["nlist"]
    if not nlist:
        return {"train_gflops": 0.0, "add_gflops": 0.0}
    sample = min(n, nlist * 64)
    return {
        "train_gflops": 2 * 10 * sample * nlist * dim / result["train_s"] / 1e9,
        "add_gflops": 2 * n * nlist * dim / result["add_s"] / 1e9,
    }


def rate(n: int, seconds: float | None) -> int | str:
    return round(n / seconds) if seconds else "-"


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["space", "vectors", "stage", "seconds", "vectors/s", "note"]
    lines = []
    for r in rows:
        n = r["vectors"]
        stages = [
            ("read (ids + vectors)", r["read_s"], ""),
            (
                "train (IVF, sampled)",
                r["train_s"],
                f"{r['structure']}, {r['nlist']} lists; {r['train_gflops']:.0f} GFLOP/s",
            ),
            ("add", r["add_s"], f"{faiss.omp_get_max_threads()} OpenMP threads; {r['add_gflops']:.0f} GFLOP/s"),
            ("tune nprobe", r.get("tune_s", 0.0), f"nprobe {r['nprobe']} for target recall {r['target_recall']}"),
            ("write files", r["write_s"], f"load {r['load_before']} -> {r['load_after']}"),
            ("total", r["total_s"], f"recall@10 {r['recall_at_10']:.4f}, p50 {r['search_p50_ms']:.2f} ms"),
        ]
        lines += [[r["space"], n, stage, seconds, rate(n, seconds), note] for stage, seconds, note in stages]
    return common.markdown_table(headers, lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--spaces", nargs="*", choices=sorted(SPACES), default=["clustered", "diffuse"])
    parser.add_argument("--queries", type=int, default=300, help="queries for recall@10")
    parser.add_argument("--nprobe", type=int, default=IndexPolicy().nprobe)
    parser.add_argument(
        "--target-recall", type=float, default=0.99, help="LLMATCH_INDEX_TARGET_RECALL: nprobe tuned at build (0: off)"
    )
    parser.add_argument("--database-url", default=None, help="PostgreSQL URL (a fresh database is made); None: SQLite")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = common.default_out(f"rebuild_{args.records}{'_pg' if args.database_url else ''}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [measure(args, space) for space in args.spaces]
    report = {"config": config(args), "machine": common.machine(), "faiss_threads": faiss.omp_get_max_threads(),
              "rows": rows}  # fmt: skip
    common.publish(args.out, report, table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
