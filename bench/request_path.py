"""Request path under concurrency: ``GET /match`` and ``GET /candidates`` against a bare route and a raw FAISS
search of the same vectors, 16 clients, SQLite and PostgreSQL, in one run.

For each backend: a fresh store, ``llmatch serve`` (in-process worker) on 127.0.0.1, a small dataset
(``--records`` product records of two sources, encoded by the service); then three phases of ``--seconds``
each, ``--clients`` keep-alive connections sending requests back to back: ``GET /healthz`` (the bare route:
the HTTP and framework floor), ``GET /match`` (two random stored records of different sources) and
``GET /candidates?k=10`` (a random stored record of the first source). The load generator is a small asyncio
HTTP/1.1 client in this process (its CPU time is reported: it shares the two cores with the server).

Baseline in this process: one exact FAISS search (``IndexFlatIP``, k=10) over the same stored vectors of the
target source, one query at a time.

    python -m bench.request_path                    # both backends, 1,000 records, 15 s per phase
    python -m bench.request_path --backends sqlite --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

from bench.common import OUT_DIR, HelpFormatter, machine, markdown_table, write_report
from bench.reliability.data import Record, by_source, expect_searchable, records, store_encoded
from bench.reliability.procs import Server, fresh_store, running

DATASET = "load"
TARGETS = {"ratio_to_bare": 0.7, "p99_ms": 50.0}


@dataclass
class Phase:
    route: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    client_cpu_seconds: float = 0.0

    def row(self, bare_rps: float | None) -> dict:
        values = np.asarray(self.latencies) * 1000.0
        p50, p99 = np.percentile(values, [50, 99]) if values.size else (float("nan"), float("nan"))
        rps = len(self.latencies) / self.seconds if self.seconds else 0.0
        return {
            "route": self.route,
            "requests": len(self.latencies) + self.errors,
            "errors": self.errors,
            "requests_per_s": round(rps, 1),
            "ratio_to_bare": round(rps / bare_rps, 3) if bare_rps else 1.0,
            "p50_ms": round(float(p50), 2),
            "p99_ms": round(float(p99), 2),
            "client_cpu_share": round(self.client_cpu_seconds / self.seconds, 2) if self.seconds else 0.0,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
        }


async def _connection(host: str, port: int, paths: list[str], until: float, phase: Phase, rng: random.Random):
    """One keep-alive connection sending GETs back to back until ``until``; reconnects after an error."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < until:
            path = rng.choice(paths)
            began = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                status, length = _status_and_length(head)
                await reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                phase.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            phase.statuses[status] = phase.statuses.get(status, 0) + 1
            if status == 200:
                phase.latencies.append(time.perf_counter() - began)
            else:
                phase.errors += 1
    finally:
        writer.close()


def _status_and_length(head: bytes) -> tuple[int, int]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return status, int(value.strip())
    raise ValueError("no content-length")


async def _run_phase(url: str, route: str, paths: list[str], clients: int, seconds: float, seed: int) -> Phase:
    host, port = url.removeprefix("http://").split(":")
    phase = Phase(route)
    warm_until = time.monotonic() + min(2.0, seconds / 5)
    warm = Phase(route)
    await asyncio.gather(*(_connection(host, int(port), paths, warm_until, warm, random.Random(i)) for i in range(3)))
    cpu = _cpu_seconds()
    started = time.monotonic()
    until = started + seconds
    await asyncio.gather(
        *(_connection(host, int(port), paths, until, phase, random.Random(seed + i)) for i in range(clients))
    )
    phase.seconds = time.monotonic() - started
    phase.client_cpu_seconds = _cpu_seconds() - cpu
    return phase


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def request_paths(items: list[Record], count: int, rng: random.Random) -> dict[str, list[str]]:
    groups = list(by_source(items).values())
    left, right = groups[0], groups[-1]

    def match() -> str:
        a, b = rng.choice(left), rng.choice(right)
        query = {
            "dataset": DATASET,
            "left_source": a.source,
            "left_id": a.id,
            "right_source": b.source,
            "right_id": b.id,
        }
        return "/match?" + urlencode(query)

    def candidates() -> str:
        a = rng.choice(left)
        return "/candidates?" + urlencode({"dataset": DATASET, "source": a.source, "id": a.id, "k": 10})

    return {
        "GET /healthz (bare)": ["/healthz"],
        "GET /match": [match() for _ in range(count)],
        "GET /candidates?k=10": [candidates() for _ in range(count)],
    }


def faiss_baseline(store, source: str, queries: int, seed: int) -> dict[str, float]:
    """One exact search (k=10) at a time over the stored vectors of ``source``: p50 and p99 in ms."""
    import faiss
    from sqlalchemy import select

    from llmatch.models import Embedding
    from llmatch.models import Record as RecordRow
    from llmatch.vectors import stack

    with store.engine().connect() as connection:
        rows = connection.execute(
            select(Embedding.vector, Embedding.dim)
            .join(RecordRow, RecordRow.embedding_id == Embedding.id)
            .where(RecordRow.source == source)
        ).all()
    vectors = stack([row[0] for row in rows], rows[0][1])
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    rng = np.random.default_rng(seed)
    picks = vectors[rng.integers(0, len(vectors), queries)]
    times = []
    for query in picks:
        began = time.perf_counter()
        index.search(query[None, :], 10)
        times.append(time.perf_counter() - began)
    p50, p99 = np.percentile(np.asarray(times) * 1000.0, [50, 99])
    return {"vectors": len(vectors), "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}


def run_backend(backend: str, items: list[Record], args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    with fresh_store(backend) as store:
        server = Server(store)
        with running(server):
            server.wait_ready()
            with server.client() as client:
                store_encoded(client, DATASET, items, timeout=3600)
                expect_searchable(client, DATASET, items[0])
            target = list(by_source(items))[-1]
            baseline = faiss_baseline(store, target, 1000, args.seed)
            phases = []
            for route, paths in request_paths(items, 2000, rng).items():
                phase = asyncio.run(_run_phase(server.url, route, paths, args.clients, args.seconds, args.seed))
                phases.append(phase)
    bare = phases[0].row(None)["requests_per_s"]
    rows = [phase.row(bare) for phase in phases]
    for row in rows:
        row["backend"] = backend
    return {"backend": backend, "faiss_search": baseline, "routes": rows}


def table(result: dict) -> str:
    keys = ("route", "requests", "errors", "requests_per_s", "ratio_to_bare", "p50_ms", "p99_ms", "client_cpu_share")
    rows = [[row[k] for k in keys] for row in result["routes"]]
    faiss = result["faiss_search"]
    note = (
        f"raw FAISS search (IndexFlatIP, {faiss['vectors']:,} vectors, k=10, one query at a time, this process): "
        f"p50 {faiss['p50_ms']} ms, p99 {faiss['p99_ms']} ms"
    )
    return f"{markdown_table(keys, rows)}\n\n{note}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.request_path", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--backends", default="sqlite,pg", help="comma-separated: sqlite, pg")
    parser.add_argument("--records", type=int, default=1000, help="stored records (two sources)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent keep-alive connections")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each timed phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "request_path.json")
    args = parser.parse_args(argv)
    items = _two_sources(args.records)
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "targets": TARGETS}
    report["results"] = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        print(
            f"== {backend}: {len(items):,} records, {args.clients} clients, {args.seconds:.0f} s per phase", flush=True
        )
        result = run_backend(backend, items, args)
        report["results"].append(result)
        print(table(result), flush=True)
    write_report(args.out, report)
    return 0


def _two_sources(count: int) -> list[Record]:
    """``count`` records, half from each of the first two shared tables."""
    half = count // 2
    first = records(half)
    second = [r for r in records(half * 2 + 10_000)[half:] if r.source != first[0].source][: count - half]
    return first + second


if __name__ == "__main__":
    sys.exit(main())
