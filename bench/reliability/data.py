"""Records for the harness: real product tables from the shared benchmarks, and small HTTP helpers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import DATASETS_DIR, read_table

# (source name, table), read in this order until enough records are taken: short product records first
# (walmart/amazon titles), then abt_buy's long descriptions.
TABLES = (
    ("walmart", DATASETS_DIR / "dirty_walmart_amazon" / "tableA.csv"),
    ("amazon", DATASETS_DIR / "dirty_walmart_amazon" / "tableB.csv"),
    ("abt", DATASETS_DIR / "abt_buy" / "tableA.csv"),
    ("buy", DATASETS_DIR / "abt_buy" / "tableB.csv"),
)
QUERY_TABLE = DATASETS_DIR / "dirty_itunes_amazon" / "tableA.csv"  # inline queries: never stored


@dataclass(frozen=True)
class Record:
    source: str
    id: str
    attributes: dict[str, Any]

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "attributes": self.attributes}


def records(count: int, tables: tuple[tuple[str, Path], ...] = TABLES) -> list[Record]:
    """The first ``count`` records of the tables, in order; ids are unique within each source."""
    taken: list[Record] = []
    for source, path in tables:
        if len(taken) >= count:
            break
        table = read_table(path, count - len(taken), exact=False)
        taken += [Record(source, str(r["id"]), r["attributes"]) for r in table.records]
    if len(taken) < count:
        raise SystemExit(f"the shared tables hold {len(taken)} records, fewer than the {count} asked for")
    return taken


def inline_queries(count: int) -> list[dict[str, Any]]:
    return [r["attributes"] for r in read_table(QUERY_TABLE, count, exact=False).records]


def by_source(items: list[Record]) -> dict[str, list[Record]]:
    grouped: dict[str, list[Record]] = {}
    for record in items:
        grouped.setdefault(record.source, []).append(record)
    return grouped


def batches(items: list[Record], size: int) -> Iterator[tuple[str, list[Record]]]:
    """(source, records) chunks of at most ``size`` records of one source."""
    for source, group in by_source(items).items():
        for start in range(0, len(group), size):
            yield source, group[start : start + size]


def expect(response: httpx.Response, *statuses: int) -> httpx.Response:
    if response.status_code not in statuses:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path} answered {response.status_code}: "
            f"{response.text[:300]}"
        )
    return response


def create_dataset(client: httpx.Client, name: str) -> None:
    expect(client.put(f"/datasets/{name}", json={"encoder": "minilm"}), 200, 201)


def ingest(client: httpx.Client, dataset: str, items: list[Record], batch: int = 1000) -> None:
    for source, chunk in batches(items, batch):
        body = {"dataset": dataset, "source": source, "records": [r.body() for r in chunk]}
        expect(client.post("/records", json=body), 202)


def store_encoded(client: httpx.Client, dataset: str, items: list[Record], timeout: float) -> None:
    """Create ``dataset``, ingest ``items`` and wait until every one is encoded."""
    create_dataset(client, dataset)
    ingest(client, dataset, items)
    wait_encoded(client, dataset, len(items), timeout=timeout)


def expect_searchable(client: httpx.Client, dataset: str, record: Record, timeout: float = 30.0) -> None:
    """Wait until the index follower has applied the stored vectors (a first record has candidates)."""
    deadline = time.monotonic() + timeout
    params = {"dataset": dataset, "source": record.source, "id": record.id, "k": 1}
    while time.monotonic() < deadline:
        response = client.get("/candidates", params=params)
        if response.status_code == 200 and response.json()["candidates"]:
            return
        time.sleep(0.2)
    raise TimeoutError("stored records are not searchable")


def totals(client: httpx.Client, dataset: str) -> dict[str, int]:
    return expect(client.get(f"/datasets/{dataset}"), 200).json()["totals"]


def wait_encoded(client: httpx.Client, dataset: str, expected: int, timeout: float, poll: float = 0.5) -> float:
    """Seconds until ``expected`` records of ``dataset`` are encoded; fails fast on a failed record."""
    started = time.monotonic()
    while True:
        counts = totals(client, dataset)
        if counts["failed"]:
            raise RuntimeError(f"{counts['failed']} records failed: {counts}")
        if counts["encoded"] >= expected:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not all {expected} records encoded after {timeout:.0f} s: {counts}")
        time.sleep(poll)
