"""A small DeepMatcher-layout benchmark that an untrained encoder gets wrong and a trained one can separate.

A match shares only the brand with its left record; a non-match shares every other word. Token overlap (what
an untrained mean-pooled encoder mostly measures) therefore ranks non-matches above matches; training has to
learn that the brand decides.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

BRANDS = ["apple", "bose", "canon", "dell", "intel", "lenovo", "nikon", "samsung", "sony", "galaxy", "iphone", "xps"]
WORDS = [
    "black",
    "brown",
    "camera",
    "digital",
    "headphones",
    "laptop",
    "lens",
    "mirrorless",
    "noise",
    "phone",
    "quick",
    "smart",
    "wireless",
    "carbon",
    "lazy",
    "dog",
    "fox",
    "body",
]


def write_separable_benchmark(folder: Path, lefts: int = 60, seed: int = 7) -> Path:
    """Write tableA/tableB and train/valid/test pairs (one match and one non-match per left record)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    table_a, table_b, pairs = [], [], []
    for i in range(lefts):
        brand, other = rng.sample(BRANDS, 2)
        words = rng.sample(WORDS, 6)
        table_a.append((f"a{i}", f"{brand} {' '.join(words[:3])}"))
        table_b.append((f"m{i}", f"{brand} {' '.join(words[3:])}"))
        table_b.append((f"n{i}", f"{other} {' '.join(words[:3])}"))
        pairs += [(f"a{i}", f"m{i}", 1), (f"a{i}", f"n{i}", 0)]
    _write(folder / "tableA.csv", ["id", "title"], table_a)
    _write(folder / "tableB.csv", ["id", "title"], table_b)
    train_end, valid_end = len(pairs) // 2, 3 * len(pairs) // 4
    _write(folder / "train.csv", ["ltable_id", "rtable_id", "label"], pairs[:train_end])
    _write(folder / "valid.csv", ["ltable_id", "rtable_id", "label"], pairs[train_end:valid_end])
    _write(folder / "test.csv", ["ltable_id", "rtable_id", "label"], pairs[valid_end:])
    return folder


def _write(path: Path, header: list[str], rows: list[tuple]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
