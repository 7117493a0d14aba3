"""A DeepMatcher benchmark's tables and labelled pairs, and loading the records they reference into a server."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

try:
    from bench import common
except ModuleNotFoundError:
    import common  # type: ignore[no-redef]

Ref = tuple[str, str]  # (source, id): sources are "a" (tableA) and "b" (tableB)
Pair = tuple[Ref, Ref]


@dataclass(frozen=True)
class Benchmark:
    name: str
    tables: dict[str, dict[str, dict[str, Any]]]  # source -> id -> attributes
    columns: list[str]
    splits: dict[str, list[tuple[str, str, int]]]  # train/valid/test -> (ltable_id, rtable_id, label)

    def pairs(self, split: str) -> dict[Pair, int]:
        return {(("a", left), ("b", right)): label for left, right, label in self.splits[split]}

    def referenced(self, *splits: str) -> set[Ref]:
        return {ref for split in splits for pair in self.pairs(split) for ref in pair}


def load_benchmark(folder: Path, skip_columns: Iterable[str] = ()) -> Benchmark:
    """The tables (without ``skip_columns``) and the labelled pairs of a DeepMatcher folder."""
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    columns: list[str] = []
    skip = set(skip_columns)
    for source, file in (("a", "tableA.csv"), ("b", "tableB.csv")):
        table = common.read_table(folder / file)
        columns = [c for c in table.columns if c not in skip]
        tables[source] = {r["id"]: {c: r["attributes"][c] for c in columns} for r in table.records}
    splits = {}
    for split in ("train", "valid", "test"):
        with (folder / f"{split}.csv").open(newline="", encoding="utf-8") as handle:
            splits[split] = [(r["ltable_id"], r["rtable_id"], int(r["label"])) for r in csv.DictReader(handle)]
    return Benchmark(folder.name, tables, columns, splits)


def load_records(
    client: httpx.Client, benchmark: Benchmark, dataset: str, refs: Iterable[Ref], timeout: float = 3600
) -> int:
    """Create ``dataset`` (MiniLM, tagged, the tables' column order) and ingest these records; wait until encoded."""
    common.check(
        client.put(f"/datasets/{dataset}", json={"encoder": common.ENCODER, "attributes": benchmark.columns}), 201
    )
    by_source: dict[str, list[dict]] = {"a": [], "b": []}
    for source, record_id in sorted(set(refs)):
        by_source[source].append({"id": record_id, "attributes": benchmark.tables[source][record_id]})
    total = 0
    for source, records in by_source.items():
        if records:
            common.post_records(client, source, records, batch=1000, dataset=dataset)
            total += len(records)
    common.wait_encoded(client, total, timeout, poll=0.5, dataset=dataset)
    return total


def match_scores(client: httpx.Client, dataset: str, pairs: Iterable[Pair]) -> dict[Pair, float]:
    """GET /match for each pair."""
    scores = {}
    for (ls, li), (rs, ri) in pairs:
        params = {"dataset": dataset, "left_source": ls, "left_id": li, "right_source": rs, "right_id": ri}
        scores[((ls, li), (rs, ri))] = common.check(client.get("/match", params=params)).json()["score"]
    return scores


def label_body(pairs: dict[Pair, int]) -> dict:
    return {
        "pairs": [
            {"left_source": ls, "left_id": li, "right_source": rs, "right_id": ri, "label": label}
            for ((ls, li), (rs, ri)), label in pairs.items()
        ]
    }
