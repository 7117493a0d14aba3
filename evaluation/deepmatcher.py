"""Reading a benchmark in DeepMatcher layout: tableA.csv, tableB.csv and labelled pairs."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

TABLES = ("tableA.csv", "tableB.csv")
SPLITS = ("train", "valid", "test")
PAIR_COLUMNS = ("ltable_id", "rtable_id", "label")
# Row counts of the published right-hand tables of benchmarks whose copies are sometimes pair subsets.
PUBLISHED_TABLE_B_ROWS = {
    "dirty_dblp_scholar": 64_263,
    "dblp_scholar": 64_263,
    "dirty_itunes_amazon": 55_923,
    "itunes_amazon": 55_923,
}


class DatasetError(ValueError):
    """A benchmark folder that is missing files or holds malformed ones."""


@dataclass(frozen=True)
class Pair:
    left_id: str
    right_id: str
    label: int


@dataclass
class Benchmark:
    name: str
    folder: Path
    attributes: list[str]
    table_a: list[dict[str, Any]]  # {"id": str, "attributes": {name: str | None}}
    table_b: list[dict[str, Any]]
    splits: dict[str, list[Pair]] = field(default_factory=dict)
    subset_note: str | None = None  # set when tableB holds only pair-referenced records

    @property
    def valid(self) -> list[Pair]:
        return self.splits["valid"]

    @property
    def test(self) -> list[Pair]:
        return self.splits["test"]


def service_name(folder: Path) -> str:
    """A dataset name the service accepts, from the folder name."""
    name = re.sub(r"[^a-z0-9_-]+", "_", folder.resolve().name.lower()).strip("_")[:64]
    return name or "benchmark"


def load(folder: Path) -> Benchmark:
    """Read and check a benchmark folder; raises DatasetError naming the file and the problem."""
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder (expected tableA.csv, tableB.csv, valid.csv, test.csv)")
    missing = [n for n in (*TABLES, "valid.csv", "test.csv") if not (folder / n).is_file()]
    if missing:
        raise DatasetError(f"{folder} lacks {', '.join(missing)} (DeepMatcher layout)")
    columns_a, table_a = _read_table(folder / "tableA.csv")
    columns_b, table_b = _read_table(folder / "tableB.csv")
    if columns_a != columns_b:
        raise DatasetError(f"tableA.csv and tableB.csv have different columns: {columns_a} vs {columns_b}")
    benchmark = Benchmark(service_name(folder), folder, columns_a, table_a, table_b)
    ids_a, ids_b = {r["id"] for r in table_a}, {r["id"] for r in table_b}
    for split in SPLITS:
        path = folder / f"{split}.csv"
        if path.is_file():
            benchmark.splits[split] = _read_pairs(path, ids_a, ids_b)
    for split in ("valid", "test"):
        labels = {pair.label for pair in benchmark.splits[split]}
        if labels != {0, 1}:
            raise DatasetError(f"{split}.csv needs both matches (1) and non-matches (0); it has {sorted(labels)}")
    benchmark.subset_note = _subset_note(benchmark)
    return benchmark


def paired_only(benchmark: Benchmark) -> Benchmark:
    """The benchmark cut down to the records that valid.csv and test.csv reference.

    Match figures do not change (every record is embedded on its own); blocking recall is then measured
    against a smaller pool, and the subset note says so.
    """
    pairs = benchmark.valid + benchmark.test
    left, right = {p.left_id for p in pairs}, {p.right_id for p in pairs}
    table_a = [r for r in benchmark.table_a if r["id"] in left]
    table_b = [r for r in benchmark.table_b if r["id"] in right]
    note = (
        f"--paired-only: {len(table_a):,} of {len(benchmark.table_a):,} tableA and {len(table_b):,} of "
        f"{len(benchmark.table_b):,} tableB records (those valid.csv and test.csv reference) were embedded; "
        "match figures are unaffected, blocking recall is measured against this smaller pool and is optimistic"
    )
    return replace(benchmark, table_a=table_a, table_b=table_b, subset_note=note)


def _read_table(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or header[0] != "id":
            raise DatasetError(f"{path}: the first column must be 'id' (header: {header})")
        rows, seen = [], set()
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise DatasetError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
            if row[0] in seen:
                raise DatasetError(f"{path}:{line}: duplicate id {row[0]!r}")
            seen.add(row[0])
            rows.append(
                {"id": row[0], "attributes": {k: (v or None) for k, v in zip(header[1:], row[1:], strict=True)}}
            )
    if not rows:
        raise DatasetError(f"{path} has no records")
    return header[1:], rows


def _read_pairs(path: Path, ids_a: set[str], ids_b: set[str]) -> list[Pair]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ())[:3] != PAIR_COLUMNS:
            raise DatasetError(f"{path}: expected columns {', '.join(PAIR_COLUMNS)}, found {reader.fieldnames}")
        pairs = []
        for line, row in enumerate(reader, start=2):
            if row["label"] not in ("0", "1"):
                raise DatasetError(f"{path}:{line}: label {row['label']!r} is not 0 or 1")
            if row["ltable_id"] not in ids_a or row["rtable_id"] not in ids_b:
                raise DatasetError(
                    f"{path}:{line}: pair ({row['ltable_id']}, {row['rtable_id']}) names a record "
                    "missing from tableA.csv or tableB.csv"
                )
            pairs.append(Pair(row["ltable_id"], row["rtable_id"], int(row["label"])))
    if not pairs:
        raise DatasetError(f"{path} has no pairs")
    return pairs


def _subset_note(benchmark: Benchmark) -> str | None:
    """Why blocking figures would be optimistic: tableB holds only records that labelled pairs reference."""
    ids_b = {r["id"] for r in benchmark.table_b}
    referenced = {pair.right_id for pairs in benchmark.splits.values() for pair in pairs}
    published = PUBLISHED_TABLE_B_ROWS.get(benchmark.name)
    if published and len(ids_b) < published:
        return (
            f"tableB.csv holds {len(ids_b):,} of the {published:,} published records (those referenced by "
            "labelled pairs): blocking recall is measured against a much smaller pool than the real table "
            "and is optimistic"
        )
    if ids_b == referenced:
        return (
            "every tableB.csv record is referenced by a labelled pair, as in a pair-referenced subset: "
            "blocking recall may be optimistic compared with the full table"
        )
    return None
