"""Read an evaluation's errors: do the two records of each pair agree on their identifier-like codes?

Usage: python -m evaluation.errors DATASET_DIR EVAL_DIR [--split valid|test] [--show "false match"] [--limit 10]

Errors are read on valid.csv (``valid_pairs.csv``) unless ``--split test`` is given: what is learnt from reading
errors shapes the method, and a method shaped on test makes its test figures optimistic.

A code is a token of at least four characters that mixes letters and digits (a model or part number such as
``hdr-sr10``), compared with hyphens dropped, or a number of four or more digits standing alone (``35113``): the
identifier tokens of ``encoding/identifiers.py``.
The table counts, per outcome in ``SPLIT_pairs.csv``, the pairs whose records share a code, whose codes all
differ, and where one record has none.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from pathlib import Path
from typing import Any

from encoding.identifiers import identifier_tokens
from encoding.render import RenderConfig, render, value_text
from evaluation import deepmatcher
from evaluation.report import OUTCOMES as OUTCOME_NAMES

OUTCOMES = tuple(OUTCOME_NAMES.values())
AGREEMENT = ("share a code", "codes differ", "no code on one side")


def codes(attributes: dict[str, Any]) -> set[str]:
    """The identifier-like tokens of a record, lower-cased, hyphens dropped."""
    return identifier_tokens(render(attributes, RenderConfig("plain")))


def agreement(left: set[str], right: set[str]) -> str:
    if not left or not right:
        return AGREEMENT[2]
    return AGREEMENT[0] if left & right else AGREEMENT[1]


def read_pairs(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


Attributes = dict[str, dict[str, Any]]  # record id -> attributes


def by_id(table: list[dict[str, Any]]) -> Attributes:
    return {record["id"]: record["attributes"] for record in table}


def tally(left: Attributes, right: Attributes, rows: list[dict[str, str]]) -> Counter[tuple[str, str]]:
    """(outcome, code agreement) -> number of pairs."""
    return Counter(
        (row["outcome"], agreement(codes(left[row["left_id"]]), codes(right[row["right_id"]]))) for row in rows
    )


def table(counts: Counter[tuple[str, str]]) -> str:
    lines = ["| outcome | pairs | " + " | ".join(AGREEMENT) + " |", "|---|---:|" + "---:|" * len(AGREEMENT)]
    for outcome in OUTCOMES:
        cells = [counts[(outcome, kind)] for kind in AGREEMENT]
        lines.append(f"| {outcome} | {sum(cells)} | " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.errors", description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("eval_dir", type=Path, help="an `llmatch evaluate --out` folder (holds SPLIT_pairs.csv)")
    parser.add_argument(
        "--split", choices=("valid", "test"), default="valid", help="pairs to read (default valid; test only to report)"
    )
    parser.add_argument("--show", choices=OUTCOMES, help="also print the records of pairs with this outcome")
    parser.add_argument("--limit", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        benchmark = deepmatcher.load(args.dataset_dir)
    except deepmatcher.DatasetError as error:
        parser.error(str(error))
    pairs_file = args.eval_dir / f"{args.split}_pairs.csv"
    if not pairs_file.is_file():
        parser.error(f"{pairs_file} is missing: run `llmatch evaluate ... --out {args.eval_dir}` first")
    rows = read_pairs(pairs_file)
    left, right = by_id(benchmark.table_a), by_id(benchmark.table_b)
    print(table(tally(left, right, rows)))
    if args.show:
        _show(left, right, [row for row in rows if row["outcome"] == args.show][: args.limit])
    return 0


def _show(left: Attributes, right: Attributes, rows: list[dict[str, str]]) -> None:
    for row in rows:
        print(f"\n{row['score']}  a/{row['left_id']}  b/{row['right_id']}")
        for side, record in (("a", left[row["left_id"]]), ("b", right[row["right_id"]])):
            print(f"  {side}: " + " | ".join(filter(None, map(value_text, record.values()))))


if __name__ == "__main__":
    raise SystemExit(main())
