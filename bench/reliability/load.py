"""Load: concurrent clients on ``GET /match`` and ``GET /candidates`` for a while, first alone ("reads"), then
while one client ingests new records and others send inline ``POST /candidates`` beside them ("mixed").
Per phase and kind of client: requests, errors (no answer or any status but the expected one; 429s, the
service's back-pressure on inline encodes, are counted apart), QPS and p50/p99 latency."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np

from bench.reliability.data import Record, by_source, expect_searchable, inline_queries, store_encoded
from bench.reliability.procs import Server, fresh_store, running

DATASET = "load"


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    refused: int = 0  # 429
    examples: list[str] = field(default_factory=list)

    def row(self, phase: str, kind: str, clients: int, seconds: float) -> dict:
        values = np.asarray(self.latencies) * 1000.0
        p50, p99 = np.percentile(values, [50, 99]) if values.size else (float("nan"), float("nan"))
        return {
            "phase": phase,
            "client": kind,
            "clients": clients,
            "requests": len(self.latencies) + self.errors + self.refused,
            "errors": self.errors,
            "refused_429": self.refused,
            "qps": round(len(self.latencies) / seconds, 1),
            "p50_ms": round(float(p50), 1),
            "p99_ms": round(float(p99), 1),
            "error_examples": self.examples[:3],
        }


def _loop(url: str, until: float, request: Callable[[httpx.Client], httpx.Response], expected: int, tally: Tally):
    with httpx.Client(base_url=url, timeout=120) as client:
        while time.monotonic() < until:
            began = time.perf_counter()
            try:
                response = request(client)
            except httpx.HTTPError as error:
                tally.errors += 1
                tally.examples.append(repr(error))
                continue
            elapsed = time.perf_counter() - began
            if response.status_code == expected:
                tally.latencies.append(elapsed)
            elif response.status_code == 429:
                tally.refused += 1
                time.sleep(float(response.headers.get("retry-after", 1)))
            else:
                tally.errors += 1
                tally.examples.append(f"{response.status_code}: {response.text[:200]}")


def _phase(server: Server, seconds: float, kinds: dict[str, tuple[int, Callable, int]]) -> dict[str, Tally]:
    until = time.monotonic() + seconds
    tallies = {kind: Tally() for kind in kinds}
    threads = []
    for kind, (count, request, expected) in kinds.items():
        for _ in range(count):
            thread = threading.Thread(target=_loop, args=(server.url, until, request, expected, tallies[kind]))
            threads.append(thread)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 300)
    return tallies


def run(
    stored: list[Record],
    extra: list[Record],
    *,
    backend: str,
    seconds: float = 60.0,
    readers: int = 16,
    inline_clients: int = 2,
    ingest_batch: int = 100,
    seed: int = 0,
) -> list[dict]:
    """Readers over ``stored`` (encoded first); the mixed phase ingests ``extra`` and sends inline queries."""
    rng = random.Random(seed)
    lock = threading.Lock()
    groups = list(by_source(stored).values())
    queries = inline_queries(200)
    pending_extra = list(extra)
    rounds = [0]

    def read(client: httpx.Client) -> httpx.Response:
        with lock:
            left, right = rng.choice(groups[0]), rng.choice(groups[-1])
            use_match = rng.random() < 0.5
        if use_match:
            params = {
                "dataset": DATASET,
                "left_source": left.source,
                "left_id": left.id,
                "right_source": right.source,
                "right_id": right.id,
            }
            return client.get("/match", params=params)
        return client.get("/candidates", params={"dataset": DATASET, "source": left.source, "id": left.id, "k": 10})

    def post_records(client: httpx.Client) -> httpx.Response:
        """New records while they last, then the same ids again with new content (updates, encoded again)."""
        with lock:
            if not pending_extra:
                rounds[0] += 1
                pending_extra.extend(_revised(extra, rounds[0]))
            chunk = [pending_extra.pop() for _ in range(min(ingest_batch, len(pending_extra)))]
        body = {"dataset": DATASET, "source": "ingested", "records": [r.body() for r in chunk]}
        return client.post("/records", json=body)

    def inline(client: httpx.Client) -> httpx.Response:
        with lock:
            attributes = rng.choice(queries)
        return client.post("/candidates", json={"dataset": DATASET, "record": {"attributes": attributes}, "k": 10})

    rows: list[dict] = []
    with fresh_store(backend) as store:
        server = Server(store)
        with running(server):
            server.wait_ready()
            with server.client() as client:
                store_encoded(client, DATASET, stored, timeout=1800)
                expect_searchable(client, DATASET, stored[0])
            reads = _phase(server, seconds, {"reads": (readers, read, 200)})
            rows.append(reads["reads"].row("reads alone", "GET /match + /candidates", readers, seconds))
            kinds = {
                "reads": (readers, read, 200),
                "ingest": (1, post_records, 202),
                "inline": (inline_clients, inline, 200),
            }
            mixed = _phase(server, seconds, kinds)
            rows.append(mixed["reads"].row("mixed", "GET /match + /candidates", readers, seconds))
            rows.append(mixed["ingest"].row("mixed", f"POST /records ({ingest_batch})", 1, seconds))
            rows.append(mixed["inline"].row("mixed", "POST /candidates inline", inline_clients, seconds))
    for row in rows:
        row["backend"] = backend
    return rows


def _revised(items: list[Record], round_: int) -> list[Record]:
    """The records with new content: each string attribute gets a revision mark."""
    mark = f" (rev {round_})"
    return [
        Record(r.source, r.id, {k: v + mark if isinstance(v, str) else v for k, v in r.attributes.items()})
        for r in items
    ]
