"""Request latency of the decision endpoints on a loaded dataset: GET /match, GET and POST /candidates.

Baselines, measured in the same run: GET /healthz on the same server (the HTTP and framework floor), and in
this process, before the server starts, one exact FAISS search (IndexFlatIP, same size and dimension, k=10)
and one MiniLM encoding of a single record (what an inline request adds).
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

try:
    from bench import common
except ModuleNotFoundError:
    import common  # type: ignore[no-redef]

NAME = "latency"
DIM = 384
K = 10


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: dict[str, Any] | None = None
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class Data:
    b: common.Table
    a: common.Table
    inline: list[dict]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--records", type=int, default=20_000, help="records in source b")
    parser.add_argument("--a-records", type=int, default=200, help="records in source a")
    parser.add_argument("--queries", type=int, default=1000, help="timed requests per endpoint")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests per endpoint first")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    parser.add_argument("--table", type=Path, default=common.DEFAULT_TABLE, help="source b: CSV, first column id")
    parser.add_argument(
        "--table-a", type=Path, default=None, help="source a and inline records; None: tableA.csv beside --table"
    )
    parser.add_argument("--batch", type=int, default=1000, help="records per POST /records while loading")
    common.add_server_arguments(parser)
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds to wait for the load to be encoded")
    parser.add_argument("--seed", type=int, default=0, help="random choices of records")
    parser.add_argument("--out", type=Path, default=common.default_out(NAME), help="JSON report")
    args = parser.parse_args(argv)
    args.table_a = args.table_a or args.table.with_name("tableA.csv")
    if args.records < K + 1 or args.a_records < 1 or args.queries < 1 or args.concurrency < 1:
        parser.error(f"need --records > {K}, --a-records >= 1, --queries >= 1 and --concurrency >= 1")
    return args


def load_data(args: argparse.Namespace) -> Data:
    b = common.read_table(args.table, args.records)
    a_all = common.read_table(args.table_a)
    if len(a_all.records) <= args.a_records:
        raise SystemExit(f"{args.table_a} needs more than {args.a_records} records (the rest are sent inline)")
    a = common.Table(a_all.path, a_all.columns, a_all.records[: args.a_records])
    return Data(b=b, a=a, inline=a_all.records[args.a_records :])


def faiss_baseline(n: int, queries: int, warmup: int, seed: int) -> dict[str, float]:
    """One exact inner-product search (k=10) over ``n`` random unit vectors, single query at a time."""
    import faiss

    rng = np.random.default_rng(seed)
    vectors = unit_rows(rng.standard_normal((n, DIM), dtype=np.float32))
    probes = unit_rows(rng.standard_normal((warmup + queries, DIM), dtype=np.float32))
    index = faiss.IndexFlatIP(DIM)
    index.add(vectors)
    for row in probes[:warmup]:
        index.search(row[None, :], K)
    return common.summarize(time_each(lambda row: index.search(row[None, :], K), probes[warmup:], "faiss search"))


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(matrix / np.linalg.norm(matrix, axis=1, keepdims=True), dtype=np.float32)


def encoder_baseline(data: Data, queries: int, warmup: int) -> dict[str, float]:
    """One MiniLM encoding of a single inline record's rendered text, in this process."""
    pool = common.load_encoder_pool()
    table = common.Table(data.a.path, data.a.columns, cycle(data.inline, warmup + queries))
    inputs = common.encoder_inputs(common.rendered_texts(table))
    for item in inputs[:warmup]:
        pool.encode(common.ENCODER, [item])
    return common.summarize(time_each(lambda item: pool.encode(common.ENCODER, [item]), inputs[warmup:], "encode"))


def time_each(call: Callable[[Any], Any], items: Sequence[Any], desc: str) -> list[float]:
    latencies = []
    for item in tqdm(items, desc=desc, unit=" calls"):
        began = time.perf_counter()
        call(item)
        latencies.append(time.perf_counter() - began)
    return latencies


def cycle(items: Sequence[Any], count: int) -> list[Any]:
    return [items[i % len(items)] for i in range(count)]


def load_server(client: httpx.Client, data: Data, args: argparse.Namespace) -> float:
    """Load sources b and a, wait until all are encoded and searchable; returns the seconds it took."""
    started = time.perf_counter()
    common.create_dataset(client)
    common.post_records(client, "b", data.b.records, args.batch)
    common.post_records(client, "a", data.a.records, args.batch)
    total = len(data.b.records) + len(data.a.records)
    common.wait_encoded(client, total, args.timeout)
    common.wait_searchable(client, [("b", data.b.records[-1]), ("a", data.a.records[-1])], args.timeout)
    return time.perf_counter() - started


def request_sets(data: Data, count: int, rng: random.Random) -> dict[str, list[Request]]:
    """``count`` requests for each endpoint, drawn at random from the stored and inline records."""
    a_ids = [record["id"] for record in data.a.records]
    b_ids = [record["id"] for record in data.b.records]
    inline = cycle(rng.sample(data.inline, len(data.inline)), count)

    def match() -> Request:
        pair = {"left_source": "a", "left_id": rng.choice(a_ids), "right_source": "b", "right_id": rng.choice(b_ids)}
        return Request("GET", "/match", {"dataset": common.DATASET, **pair})

    def candidates(source: str, ids: list[str], target: str | None) -> Request:
        params = {"dataset": common.DATASET, "source": source, "id": rng.choice(ids), "k": K}
        return Request("GET", "/candidates", params | ({"target_source": target} if target else {}))

    def inline_candidates(record: dict) -> Request:
        body = {"dataset": common.DATASET, "record": {"attributes": record["attributes"]}, "k": K, "target_source": "b"}
        return Request("POST", "/candidates", body=body)

    return {
        "GET /healthz": [Request("GET", "/healthz") for _ in range(count)],
        "GET /match": [match() for _ in range(count)],
        "GET /candidates a->b (default target)": [candidates("a", a_ids, None) for _ in range(count)],
        "GET /candidates b->b (target_source=b)": [candidates("b", b_ids, "b") for _ in range(count)],
        "POST /candidates inline (target_source=b)": [inline_candidates(record) for record in inline],
    }


def send(client: httpx.Client, request: Request) -> float:
    began = time.perf_counter()
    response = client.request(request.method, request.path, params=request.params, json=request.body)
    elapsed = time.perf_counter() - began
    common.check(response)
    return elapsed


def run_endpoint(
    client: httpx.Client, name: str, requests: list[Request], warmup: int, concurrency: int
) -> dict[str, float]:
    for request in requests[:warmup]:
        send(client, request)
    timed = requests[warmup:]
    started = time.perf_counter()
    if concurrency == 1:
        latencies = [send(client, request) for request in tqdm(timed, desc=name, unit=" req")]
    else:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            jobs = pool.map(lambda request: send(client, request), timed)
            latencies = list(tqdm(jobs, total=len(timed), desc=name, unit=" req"))
    wall = time.perf_counter() - started
    return {**common.summarize(latencies), "requests_per_s": len(timed) / wall}


def measure_endpoints(client: httpx.Client, data: Data, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    sets = request_sets(data, args.warmup + args.queries, random.Random(args.seed))
    return {
        name: run_endpoint(client, name, requests, args.warmup, args.concurrency) for name, requests in sets.items()
    }


def build_report(args: argparse.Namespace, baselines: dict, endpoints: dict, load_s: float) -> dict[str, Any]:
    floor = endpoints["GET /healthz"]["p50_ms"]
    return {
        "benchmark": NAME,
        "machine": common.machine(),
        "config": {
            "records_b": args.records,
            "records_a": args.a_records,
            "queries": args.queries,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "k": K,
            "table": str(args.table),
            "table_a": str(args.table_a),
            "backend": "postgresql" if args.database_url else "sqlite",
            "encoder": common.ENCODER,
            "load_seconds": load_s,
        },
        "baselines": {"GET /healthz": endpoints["GET /healthz"], **baselines},
        "endpoints": {name: stats for name, stats in endpoints.items() if name != "GET /healthz"},
        "ratios": {f"{name} p50 / GET /healthz p50": stats["p50_ms"] / floor for name, stats in endpoints.items()},
    }


def markdown(report: dict[str, Any]) -> str:
    config, floor = report["config"], report["baselines"]["GET /healthz"]["p50_ms"]
    rows = []
    for label, stats in [*report["endpoints"].items(), *report["baselines"].items()]:
        rps = stats.get("requests_per_s")
        rows.append(
            (
                label,
                stats["n"],
                stats["p50_ms"],
                stats["p90_ms"],
                stats["p99_ms"],
                stats["mean_ms"],
                f"{rps:,.1f}" if rps is not None else "in-process",
                f"{stats['p50_ms'] / floor:.2f}x",
            )
        )
    headers = ("endpoint", "n", "p50 ms", "p90 ms", "p99 ms", "mean ms", "req/s", "p50 / healthz p50")
    title = (
        f"## Latency: {config['records_b']:,} records in b + {config['records_a']:,} in a, k={config['k']}, "
        f"{config['backend']}, concurrency {config['concurrency']}, {report['machine']['cpu_cores']} CPU cores"
    )
    return title + "\n\n" + common.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = load_data(args)
    baselines = {
        f"FAISS IndexFlatIP search, {args.records:,}x{DIM}, k={K} (in-process)": faiss_baseline(
            args.records, args.queries, args.warmup, args.seed
        ),
        "MiniLM encode 1 record (in-process)": encoder_baseline(data, args.queries, args.warmup),
    }
    gc.collect()
    log_copy = args.out.with_suffix(".server.log")
    with common.fresh_database(args.database_url) as database_url:
        with common.Server(database_url, args.worker_batch_size, log_copy=log_copy) as server:
            with server.client(connections=max(10, args.concurrency)) as client:
                load_s = load_server(client, data, args)
                endpoints = measure_endpoints(client, data, args)
    report = build_report(args, baselines, endpoints, load_s)
    common.publish(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
