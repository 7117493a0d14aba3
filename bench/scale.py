"""Scale benchmarks: the index structures measured alone (FAISS, in process), and the service over 100,000 to
1,000,000 stored vectors. Vectors are written straight into the store (``bench/vectors.py``), so the encoder is
not the clock.

    python -m bench.scale faiss     --sizes 100000 1000000          # structures: build rate, latency, recall@10
    python -m bench.scale dim4096   --records 100000                # 4,096-dim memory and recall, full and reduced
    python -m bench.scale service   --records 1000000               # start-up, rebuild rate, memory, latency

Every latency is one query at a time unless the row says otherwise; recall@10 is measured against exact search
(``IndexFlatIP``) over the same vectors in the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.vectors import Space, real_vectors, store_vectors  # noqa: E402
from llmatch.settings import Settings  # noqa: E402
from matching.index import VectorIndex, single_threaded  # noqa: E402
from matching.index_policy import IndexPolicy  # noqa: E402

REAL_CACHE = common.OUT_DIR / "real_minilm.npy"
DEFAULTS = Settings.model_fields
INGEST_TABLE = common.DATASETS_DIR / "dirty_walmart_amazon" / "tableB.csv"
# Recall depends on the data: two synthetic distributions, one with tight topical clusters (as product catalogues
# have), one diffuse (neighbours barely closer than strangers), and MiniLM vectors of real records (--real).
SPACES = {
    "clustered": Space(latent=32, clusters=1000, spread=0.5, noise=0.15),
    "diffuse": Space(),
    "skewed": Space.skewed(),  # power-law cluster sizes, varied spreads, near-duplicates (bench/vectors.py)
}


def exact_top(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Positions of the exact top ``k`` rows of ``base`` for each query (inner product)."""
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    return index.search(queries, k)[1]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def time_queries(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray) -> tuple[dict, np.ndarray]:
    """Latency of one query at a time, and the ids each query found."""
    seconds, found = [], []
    with single_threaded():  # as the service searches (service/index.py)
        for query in queries[:10]:
            search(query[None])
        for query in queries:
            began = time.perf_counter()
            found.append(search(query[None])[0])
            seconds.append(time.perf_counter() - began)
    return common.summarize(seconds), np.stack(found)


def config(args: argparse.Namespace) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


def faiss_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).size)


# ---------------------------------------------------------------------------------------------- faiss structures


def measure_structures(
    base: np.ndarray, queries: np.ndarray, nprobes: Sequence[int], hnsw: bool, label: str
) -> list[dict[str, Any]]:
    """Exact, IVF (the service's VectorIndex) and optionally HNSW over ``base``: build, memory, latency, recall."""
    n = len(base)
    ids = np.arange(n, dtype=np.int64)
    truth = exact_top(base, queries, 10)
    rows = []

    began = time.perf_counter()
    exact = VectorIndex.build(ids, ids, base, policy=IndexPolicy(kind="flat"))
    build = time.perf_counter() - began
    latency, found = time_queries(lambda q: exact.search(q, 10)[1], queries)
    rows.append(row(label, n, "exact (IndexFlatIP)", build, faiss_bytes(exact.cpu), latency, recall_at(found, truth)))
    exact_p50 = latency["p50_ms"]
    exact = None  # free its memory before the next structure

    began = time.perf_counter()
    ivf = VectorIndex.build(ids, ids, base, policy=IndexPolicy(kind="ivf"))
    build = time.perf_counter() - began
    size = faiss_bytes(ivf.cpu)
    for nprobe in nprobes:
        ivf.cpu.nprobe = nprobe
        latency, found = time_queries(lambda q: ivf.search(q, 10)[1], queries)
        name = f"IVF{ivf.cpu.nlist},Flat nprobe={nprobe}"
        rows.append(row(label, n, name, build, size, latency, recall_at(found, truth)))
    ivf = None

    began = time.perf_counter()
    half = VectorIndex.build(ids, ids, base, policy=IndexPolicy(kind="ivf", storage="float16"))
    build = time.perf_counter() - began
    latency, found = time_queries(lambda q: half.search(q, 10)[1], queries)
    name = f"IVF{half.cpu.nlist},SQfp16 nprobe={half.cpu.nprobe}"
    rows.append(row(label, n, name, build, faiss_bytes(half.cpu), latency, recall_at(found, truth)))
    half = None

    if hnsw:
        graph = faiss.IndexHNSWFlat(base.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = 40
        began = time.perf_counter()
        graph.add(base)
        build = time.perf_counter() - began
        size = faiss_bytes(graph)
        for ef in (64, 128, 256):
            graph.hnsw.efSearch = ef
            latency, found = time_queries(lambda q: graph.search(q, 10)[1], queries)
            rows.append(row(label, n, f"HNSW32 efSearch={ef}", build, size, latency, recall_at(found, truth)))
    for entry in rows:
        entry["p50_vs_exact"] = entry["p50_ms"] / exact_p50
    return rows


def row(data: str, n: int, structure: str, build_s: float, size: int, latency: dict, recall: float) -> dict:
    return {
        "data": data,
        "vectors": n,
        "structure": structure,
        "build_s": build_s,
        "build_vectors_per_s": n / build_s,
        "bytes_per_vector": size / n,
        "p50_ms": latency["p50_ms"],
        "p99_ms": latency["p99_ms"],
        "recall_at_10": recall,
    }


STRUCTURE_HEADERS = ["data", "vectors", "structure", "build (vectors/s)", "bytes/vector", "p50 ms", "p99 ms",
                     "p50 / exact", "recall@10"]  # fmt: skip


def structure_rows(rows: Sequence[dict]) -> list[list[Any]]:
    return [
        [r["data"], r["vectors"], r["structure"], round(r["build_vectors_per_s"]), round(r["bytes_per_vector"]),
         r["p50_ms"], r["p99_ms"], r["p50_vs_exact"], r["recall_at_10"]]
        for r in rows
    ]  # fmt: skip


def run_faiss(args: argparse.Namespace) -> int:
    rows: list[dict] = []
    for name in args.spaces:
        for n in args.sizes:
            base = SPACES[name].array(n, seed=1)
            queries = SPACES[name].array(args.queries, seed=2)
            rows += measure_structures(base, queries, args.nprobe, n <= args.hnsw_max, name)
            del base
    if args.real:
        vectors = real_vectors(REAL_CACHE)
        rng = np.random.default_rng(3)
        order = rng.permutation(len(vectors))
        queries, base = vectors[order[: args.queries]], vectors[order[args.queries :]]
        rows += measure_structures(
            np.ascontiguousarray(base), np.ascontiguousarray(queries), args.nprobe, True, "MiniLM"
        )
    report = {"config": config(args), "machine": common.machine(), "faiss_threads": faiss.omp_get_max_threads(),
              "rows": rows}  # fmt: skip
    common.publish(args.out, report, common.markdown_table(STRUCTURE_HEADERS, structure_rows(rows)))
    return 0


# ---------------------------------------------------------------------------------------------- 4,096 dimensions


def run_dim4096(args: argparse.Namespace) -> int:
    """Memory and recall of full and reduced forms for LLM-sized vectors; per-vector bytes scale to any count."""
    dim, n = 4096, args.records
    space = Space(dim=dim, latent=32, clusters=1000, spread=0.5, noise=0.15 * np.sqrt(384 / dim))  # as clustered
    base = space.array(n, seed=1)
    queries = space.array(args.queries, seed=2)
    truth = exact_top(base, queries, 10)
    ip = faiss.METRIC_INNER_PRODUCT
    nlist = int(np.sqrt(n))
    sample = base[np.random.default_rng(0).choice(n, min(n, nlist * 64), replace=False)]
    forms: list[tuple[str, Callable[[], faiss.Index]]] = [
        ("Flat float32 (exact)", lambda: faiss.IndexFlatIP(dim)),
        ("SQfp16 (flat, float16)", lambda: faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, ip)),
        ("SQ8 (flat, 8-bit)", lambda: faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, ip)),
        (f"IVF{nlist},SQfp16", lambda: faiss.index_factory(dim, f"IVF{nlist},SQfp16", ip)),
        (f"IVF{nlist},PQ256", lambda: faiss.index_factory(dim, f"IVF{nlist},PQ256", ip)),
        (f"IVF{nlist},PQ512", lambda: faiss.index_factory(dim, f"IVF{nlist},PQ512", ip)),
    ]
    rows = []
    for name, make in forms:
        if args.only and not any(word in name for word in args.only):
            continue
        index = make()
        began = time.perf_counter()
        if not index.is_trained:
            index.train(sample)
        index.add(base)
        build = time.perf_counter() - began
        ivf = faiss.try_extract_index_ivf(index) if "IVF" in name else None
        if ivf is not None:
            ivf.nprobe = args.nprobe
        latency, found = time_queries(lambda q, index=index: index.search(q, 10)[1], queries)
        size = faiss_bytes(index)
        rows.append({**row("synthetic 4096", n, name, build, size, latency, recall_at(found, truth)),
                     "gib_per_million": size / n * 1e6 / 2**30})  # fmt: skip
        print(rows[-1], flush=True)
        del index
    headers = ["form", "bytes/vector", "GiB per 1,000,000", "build (vectors/s)", "p50 ms", "p99 ms", "recall@10"]
    table = common.markdown_table(headers, [
        [r["structure"], round(r["bytes_per_vector"]), r["gib_per_million"], round(r["build_vectors_per_s"]),
         r["p50_ms"], r["p99_ms"], r["recall_at_10"]] for r in rows])  # fmt: skip
    common.publish(args.out, {"config": config(args), "machine": common.machine(), "rows": rows}, table)
    return 0


# ---------------------------------------------------------------------------------------------- the service


class Serve:
    """``llmatch serve --no-worker [--workers N]`` on a given data directory, started cold and stopped with SIGTERM."""

    def __init__(
        self, data_dir: Path, database_url: str | None, log: Path, extra_env: dict[str, str], workers: int = 1
    ):
        self.port = common.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ.copy()
        env.update(LLMATCH_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra_env)
        env.pop("LLMATCH_DATABASE_URL", None)
        if database_url:
            env["LLMATCH_DATABASE_URL"] = database_url
        self.env, self.log, self.workers = env, log, workers
        command = [common.llmatch_command(), "serve", "--no-worker", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--workers", str(workers)]
        began = time.monotonic()
        self.process = subprocess.Popen(command, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        self.ready_s = common.wait_until_ready(self.url, self.process, 1800, lambda: f"see {self.log}", began)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def memory(self) -> dict[str, int]:
        """Resident (RSS) and proportional (PSS: each shared page divided among its processes) memory, summed over
        the server's processes: with ``--workers N`` the sum of PSS is what they take together."""
        pids = [self.process.pid, *_children(self.process.pid)]
        totals = {"processes": len(pids), "rss_bytes": 0, "pss_bytes": 0}
        for pid in pids:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in ("Rss", "Pss"):
                    totals[f"{name.lower()}_bytes"] += int(value.split()[0]) * 1024
        return totals

    def stop(self) -> None:
        common.stop_process(self.process, 600)


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for task in tasks.iterdir() for c in (task / "children").read_text().split()]


def index_log(log: Path) -> dict[str, float]:
    """The service's own account of its last start-up: seconds to load or rebuild every index."""
    found = re.findall(r"indexes ready in ([\d.]+)s: (\d+) loaded from file, (\d+) rebuilt", log.read_text())
    seconds, loaded, rebuilt = found[-1]
    return {"index_s": float(seconds), "loaded": int(loaded), "rebuilt": int(rebuilt)}


def http_latency(url: str, paths: Sequence[str], clients: int) -> dict[str, float]:
    """Each path requested once, spread over ``clients`` concurrent clients (one connection each)."""
    seconds: list[float] = []
    errors = 0
    lock = threading.Lock()

    def work(part: Sequence[str]) -> None:
        nonlocal errors
        mine, failed = [], 0
        with httpx.Client(base_url=url, timeout=60) as client:
            for path in part[:5]:
                client.get(path)
            for path in part:
                began = time.perf_counter()
                response = client.get(path)
                mine.append(time.perf_counter() - began)
                failed += response.status_code != 200
        with lock:
            seconds.extend(mine)
            errors += failed

    parts = [paths[i::clients] for i in range(clients)]
    began = time.perf_counter()
    threads = [threading.Thread(target=work, args=(part,)) for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    return {**common.summarize(seconds), "requests_per_s": len(seconds) / wall, "errors": errors}


def run_service(args: argparse.Namespace) -> int:
    n, q = args.records, args.queries
    space = SPACES[args.space]
    extra = {
        "LLMATCH_INDEX_SAVE_SECONDS": "0",
        "LLMATCH_INDEX_NPROBE": str(args.nprobe),
        "LLMATCH_INDEX_STORAGE": args.storage,
        "LLMATCH_INDEX_TARGET_RECALL": str(args.target_recall),
        "LLMATCH_INDEX_LISTS_PER_SQRT": str(args.lists_per_sqrt),
    }
    report: dict[str, Any] = {"config": config(args), "machine": common.machine()}
    with tempfile.TemporaryDirectory(prefix="llmatch-scale-") as tmp, common.fresh_database(args.database_url) as url:
        data_dir = Path(tmp)
        log = args.out.with_suffix(".server.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(b"")
        env = {**os.environ, "LLMATCH_DATA_DIR": str(data_dir)}
        if url:
            env["LLMATCH_DATABASE_URL"] = url
        subprocess.run([common.llmatch_command(), "migrate"], env=env, check=True, capture_output=True)

        empty = Serve(data_dir, url, log, extra)  # the same service over no vectors: the memory baseline
        report["rss_empty_bytes"] = empty.rss_bytes()
        empty.stop()

        from llmatch.db import make_engine

        engine = make_engine(url or f"sqlite:///{data_dir / 'llmatch.sqlite3'}")
        began = time.perf_counter()
        store_vectors(engine, "scale", "b", space.sample(n, seed=1))
        store_vectors(engine, "scale", "a", space.sample(q, seed=2))
        engine.dispose()
        report["store_s"] = time.perf_counter() - began
        print(f"stored {n + q:,} vectors in {report['store_s']:.1f} s", flush=True)

        cold = Serve(data_dir, url, log, extra)
        report["cold_no_files"] = {"ready_s": cold.ready_s, **index_log(log)}
        report["rebuild_vectors_per_s"] = (n + q) / report["cold_no_files"]["index_s"]
        print(report["cold_no_files"], flush=True)
        report.update(measure_requests(cold, args, space))
        report["rss_bytes"] = cold.rss_bytes()
        report["rss_per_vector_bytes"] = (report["rss_bytes"] - report["rss_empty_bytes"]) / (n + q)
        cold.stop()  # writes the index files

        warm = Serve(data_dir, url, log, extra)
        report["cold_with_files"] = {"ready_s": warm.ready_s, **index_log(log)}
        report["rss_loaded_bytes"] = warm.rss_bytes()
        warm.stop()
        report["index_files_bytes"] = sum(f.stat().st_size for f in (data_dir / "indexes").iterdir())
        report["processes"] = [measure_processes(Serve(data_dir, url, log, extra, n), args) for n in args.workers]
    common.publish(args.out, report, service_table(report))
    return 0


def request_paths(args: argparse.Namespace, count: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """``count`` /candidates and /match requests over random query records (and random stored ones for /match)."""
    asked = rng.integers(args.queries, size=count)
    candidates = [f"/candidates?dataset=scale&source=a&id=a-{i}&k=10" for i in asked]
    match = [f"/match?dataset=scale&left_source=a&left_id=a-{i}&right_source=b&right_id=b-{j}"
             for i, j in zip(asked, rng.integers(args.records, size=count), strict=True)]  # fmt: skip
    return candidates, match


def measure_processes(server: Serve, args: argparse.Namespace) -> dict[str, Any]:
    """``serve --workers N`` started from the index files: memory of all its processes, one client's latency
    and 16 clients' tails (``--process-requests`` requests each); with ``--ingest-beside``, while real records are
    encoded and indexed beside them."""
    ingestion = IngestBeside(server, args.ingest_beside) if args.ingest_beside else None
    try:
        candidates, match = request_paths(args, args.process_requests, np.random.default_rng(5))
        result: dict[str, Any] = {"workers": server.workers, "ready_s": server.ready_s}
        if ingestion is not None:
            ingestion.start()
        result["candidates_1"] = http_latency(server.url, candidates[: args.requests], 1)
        result["candidates_16"] = http_latency(server.url, candidates, 16)
        result["match_1"] = http_latency(server.url, match[: args.requests], 1)
        result["match_16"] = http_latency(server.url, match, 16)
        if ingestion is not None:
            result["ingestion"] = ingestion.finish()
        result.update(server.memory())
    finally:
        if ingestion is not None:
            ingestion.stop()
        server.stop()
    print("processes", {k: v for k, v in result.items() if not isinstance(v, dict)}, result.get("ingestion"))
    return result


class IngestBeside:
    """Ingestion beside the timed requests: real records of ``INGEST_TABLE`` posted to another dataset (MiniLM) and
    encoded by a standalone ``llmatch worker`` on the same store, so the API processes index them meanwhile."""

    def __init__(self, server: Serve, records: int):
        self.server, self.records = server, common.read_table(INGEST_TABLE, records).records
        command = [common.llmatch_command(), "worker"]
        self.worker = subprocess.Popen(command, env=server.env, stdout=server.log.open("ab"), stderr=subprocess.STDOUT)
        self.began, self.at_start = 0.0, 0

    def start(self) -> None:
        """Post every record (fast: the worker encodes them while the requests are timed), then wait until the
        worker has stored its first vectors, so that encoding runs from the first timed request on."""
        with httpx.Client(base_url=self.server.url, timeout=120) as client:
            common.create_dataset(client, "ingest")
            common.post_records(client, "b", self.records, 1000, dataset="ingest")
            deadline = time.monotonic() + 300
            while (at_start := self._encoded()) == 0:
                if time.monotonic() > deadline or self.worker.poll() is not None:
                    raise RuntimeError(f"the worker encoded nothing; see {self.server.log}")
                time.sleep(0.5)
        self.began, self.at_start = time.perf_counter(), at_start

    def finish(self) -> dict[str, float]:
        """Records the worker encoded while the requests were timed, and its rate."""
        seconds = time.perf_counter() - self.began
        encoded = self._encoded() - self.at_start
        return {"posted": len(self.records), "encoded": encoded, "seconds": seconds, "encoded_per_s": encoded / seconds}

    def _encoded(self) -> int:
        answer = common.check(httpx.get(f"{self.server.url}/datasets/ingest", timeout=60))
        return int(answer.json()["totals"]["encoded"])

    def stop(self) -> None:
        common.stop_process(self.worker, 120)


def measure_requests(server: Serve, args: argparse.Namespace, space: Space) -> dict[str, Any]:
    n, q = args.records, args.queries
    rng = np.random.default_rng(4)
    candidates, match = request_paths(args, args.requests, rng)
    results: dict[str, Any] = {}
    results["healthz_1"] = http_latency(server.url, ["/healthz"] * args.requests, 1)
    results["candidates_1"] = http_latency(server.url, candidates, 1)
    results["candidates_16"] = http_latency(server.url, candidates, 16)
    results["match_1"] = http_latency(server.url, match, 1)
    results["match_16"] = http_latency(server.url, match, 16)
    for name, value in results.items():
        print(name, {k: round(v, 2) for k, v in value.items()}, flush=True)

    # recall@10 of what the service answers, against exact search over the same stored vectors
    base = space.array(n, seed=1)
    queries = space.array(q, seed=2)
    sample = rng.choice(q, size=min(q, args.recall_queries), replace=False)
    truth = exact_top(base, queries[sample], 10)
    found = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for i in sample:
            answer = common.check(client.get(f"/candidates?dataset=scale&source=a&id=a-{i}&k=10")).json()
            found.append([int(c["id"].removeprefix("b-")) for c in answer["candidates"]])
    results["recall_at_10"] = recall_at(np.array(found), truth)

    # in-process baseline: the same structure the service chose, searched directly
    # the server's policy: its target recall tunes nprobe as the server's build did
    policy = IndexPolicy(
        nprobe=args.nprobe, storage=args.storage, target_recall=args.target_recall, lists_per_sqrt=args.lists_per_sqrt
    )
    index = VectorIndex.build(np.arange(n), np.arange(n), base, policy=policy)
    latency, _ = time_queries(lambda x: index.search(x, 10)[1], queries[sample])
    results["faiss_in_process"] = {**latency, "structure": index.structure, "nprobe": getattr(index.cpu, "nprobe", 0)}
    return results


def service_table(r: dict[str, Any]) -> str:
    n = r["config"]["records"]
    c1, c16, m1, m16 = r["candidates_1"], r["candidates_16"], r["match_1"], r["match_16"]
    rows = [
        ["vectors in source b (384 dims) + queries in a", f"{n:,} + {r['config']['queries']:,}"],
        ["start-up from a cold process, no index files: ready after (s)", r["cold_no_files"]["ready_s"]],
        ["  of which loading indexes (rebuilt from stored vectors) (s)", r["cold_no_files"]["index_s"]],
        ["rebuild rate (vectors/s)", round(r["rebuild_vectors_per_s"])],
        ["start-up from a cold process, with index files: ready after (s)", r["cold_with_files"]["ready_s"]],
        ["  of which loading indexes from files (s)", r["cold_with_files"]["index_s"]],
        ["resident memory, empty service -> with the vectors (MiB)",
         f"{r['rss_empty_bytes'] / 2**20:,.0f} -> {r['rss_bytes'] / 2**20:,.0f}"],
        ["resident memory per vector (bytes)", round(r["rss_per_vector_bytes"])],
        ["index files on disk (MiB)", r["index_files_bytes"] / 2**20],
        ["in-process index search, k=10 (structure, nprobe; p50 / p99 ms)",
         f"{r['faiss_in_process']['structure']}, {r['faiss_in_process'].get('nprobe', '-')}; "
         f"{r['faiss_in_process']['p50_ms']:.2f} / "
         f"{r['faiss_in_process']['p99_ms']:.2f}"],
        ["GET /healthz, 1 client: p50 (ms)", r["healthz_1"]["p50_ms"]],
        ["GET /candidates?k=10, 1 client: p50 / p99 (ms)", f"{c1['p50_ms']:.2f} / {c1['p99_ms']:.2f}"],
        ["GET /candidates?k=10, 16 clients: p50 / p99 (ms); requests/s",
         f"{c16['p50_ms']:.2f} / {c16['p99_ms']:.2f}; {c16['requests_per_s']:.0f}"],
        ["GET /match, 1 client: p50 / p99 (ms)", f"{m1['p50_ms']:.2f} / {m1['p99_ms']:.2f}"],
        ["GET /match, 16 clients: p50 / p99 (ms); requests/s",
         f"{m16['p50_ms']:.2f} / {m16['p99_ms']:.2f}; {m16['requests_per_s']:.0f}"],
        ["recall@10 of /candidates against exact search", r["recall_at_10"]],
        ["errors (non-200 answers)", sum(r[k]["errors"] for k in ("candidates_1", "candidates_16", "match_1",
                                                                   "match_16"))],
    ]  # fmt: skip
    table = common.markdown_table(["measure", "value"], rows)
    return table + ("\n\n" + processes_table(r["processes"]) if r.get("processes") else "")


def _ingested(measured: dict[str, Any]) -> str:
    ingestion = measured.get("ingestion")
    if not ingestion:
        return "-"
    return f"{ingestion['encoded']:,} of {ingestion['posted']:,} ({ingestion['encoded_per_s']:.0f})"


def processes_table(measured: Sequence[dict[str, Any]]) -> str:
    """One row per ``serve --workers N``: memory of all processes together and the tails under 16 clients."""

    def tail(m: dict[str, float]) -> str:
        return f"{m['p50_ms']:.1f} / {m['p99_ms']:.1f}; {m['requests_per_s']:.0f}"

    rows = [
        [p["workers"], p["processes"], p["pss_bytes"] / 2**20, p["rss_bytes"] / 2**20,
         f"{p['candidates_1']['p50_ms']:.2f} / {p['candidates_1']['p99_ms']:.2f}", tail(p["candidates_16"]),
         f"{p['match_1']['p50_ms']:.2f} / {p['match_1']['p99_ms']:.2f}", tail(p["match_16"]),
         sum(p[k]["errors"] for k in ("candidates_1", "candidates_16", "match_1", "match_16")), _ingested(p)]
        for p in measured
    ]  # fmt: skip
    headers = ["API processes", "processes in all", "PSS summed (MiB)", "RSS summed (MiB)",
               "/candidates 1 client p50 / p99 ms", "/candidates 16 clients p50 / p99 ms; req/s",
               "/match 1 client p50 / p99 ms", "/match 16 clients p50 / p99 ms; req/s", "errors",
               "encoded beside (records/s)"]  # fmt: skip
    return common.markdown_table(headers, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    structures = commands.add_parser("faiss", help="index structures alone", formatter_class=common.HelpFormatter)
    structures.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    structures.add_argument("--queries", type=int, default=500)
    structures.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    structures.add_argument("--spaces", nargs="*", choices=sorted(SPACES), default=sorted(SPACES))
    structures.add_argument("--hnsw-max", type=int, default=100_000, help="largest size HNSW is built for")
    structures.add_argument(
        "--real", action="store_true", help=f"also MiniLM vectors of the shared tables ({REAL_CACHE})"
    )
    structures.add_argument("--out", type=Path, default=common.default_out("scale_faiss"))
    wide = commands.add_parser("dim4096", help="4,096-dim vectors", formatter_class=common.HelpFormatter)
    wide.add_argument("--records", type=int, default=100_000)
    wide.add_argument("--queries", type=int, default=200)
    wide.add_argument("--nprobe", type=int, default=32)
    wide.add_argument("--only", nargs="*", help="measure only forms whose name holds one of these words")
    wide.add_argument("--out", type=Path, default=common.default_out("scale_dim4096"))
    service = commands.add_parser(
        "service", help="the service over stored vectors", formatter_class=common.HelpFormatter
    )
    service.add_argument("--records", type=int, default=100_000)
    service.add_argument("--queries", type=int, default=1_000, help="records of source a, the queries")
    service.add_argument("--requests", type=int, default=200, help="timed requests per endpoint and client count")
    service.add_argument("--recall-queries", type=int, default=300)
    service.add_argument("--nprobe", type=int, default=IndexPolicy().nprobe)
    service.add_argument("--space", choices=sorted(SPACES), default="clustered", help="synthetic distribution")
    service.add_argument("--storage", choices=("float32", "float16"), default="float32", help="LLMATCH_INDEX_STORAGE")
    service.add_argument(
        "--target-recall",
        type=float,
        default=DEFAULTS["index_target_recall"].default,
        help="LLMATCH_INDEX_TARGET_RECALL",
    )
    service.add_argument(
        "--lists-per-sqrt",
        type=float,
        default=DEFAULTS["index_lists_per_sqrt"].default,
        help="LLMATCH_INDEX_LISTS_PER_SQRT",
    )
    service.add_argument("--database-url", default=None, help="PostgreSQL URL (a fresh database is made); None: SQLite")
    service.add_argument(
        "--workers",
        type=int,
        nargs="*",
        default=[],
        help="also serve with `--workers N` for each N (from index files): memory of all processes, tails",
    )
    service.add_argument("--process-requests", type=int, default=2000, help="requests per 16-client phase there")
    service.add_argument(
        "--ingest-beside",
        type=int,
        default=0,
        metavar="RECORDS",
        help="there, post this many real records to another dataset first, encoded by a `llmatch worker` meanwhile",
    )
    service.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "service" and args.out is None:
        args.out = common.default_out(f"scale_service_{args.records}{'_pg' if args.database_url else ''}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return {"faiss": run_faiss, "dim4096": run_dim4096, "service": run_service}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
