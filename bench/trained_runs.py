"""Train with ``llmatch train`` and report with ``llmatch evaluate``, exactly as a user runs them."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common

PAIR_FILES = ("train.csv", "valid.csv", "test.csv")


@dataclass(frozen=True)
class Evaluation:
    """The figures of one ``llmatch evaluate`` report, and how long training and evaluation took."""

    valid_f1: float
    test_f1: float
    test_precision: float
    test_recall: float
    threshold: float
    identifier_weight: float | None
    test_ece: float | None
    train_seconds: float
    evaluate_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train(folders: Sequence[Path], out: Path, flags: Sequence[str] = ()) -> float:
    """``llmatch train FOLDERS --base minilm --out OUT FLAGS``; returns its wall-clock seconds."""
    began = time.perf_counter()
    command = [common.llmatch_command(), "train", *map(str, folders), "--base", "minilm", "--out", str(out), *flags]
    subprocess.run(command, check=True)
    return time.perf_counter() - began


def evaluate(folder: Path, encoder: str | Path, out: Path, train_seconds: float = 0.0) -> Evaluation:
    """``llmatch evaluate FOLDER --encoder ENCODER --paired-only``: threshold on valid, figures on test."""
    began = time.perf_counter()
    command = [common.llmatch_command(), "evaluate", str(folder), "--encoder", str(encoder), "--paired-only"]
    subprocess.run([*command, "--out", str(out)], check=True)
    seconds = time.perf_counter() - began
    report = json.loads((out / "report.json").read_text())
    calibration = (report.get("calibration") or {}).get("test", {})
    return Evaluation(
        valid_f1=report["valid"]["f1"],
        test_f1=report["test"]["f1"],
        test_precision=report["test"]["precision"],
        test_recall=report["test"]["recall"],
        threshold=report["threshold"],
        identifier_weight=report.get("identifier_weight"),
        test_ece=calibration.get("ece"),
        train_seconds=train_seconds,
        evaluate_seconds=seconds,
    )


def read_pairs(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a DeepMatcher pair file (``ltable_id,rtable_id,label``)."""
    with path.open(newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    return header, rows


def stratified_sample(rows: list[list[str]], size: int, rng: random.Random) -> list[list[str]]:
    """``size`` pairs keeping the file's share of matches, with at least one match and one non-match."""
    matches = [row for row in rows if row[-1] == "1"]
    others = [row for row in rows if row[-1] != "1"]
    size = min(size, len(rows))
    wanted = min(len(matches), max(1, round(size * len(matches) / len(rows))))
    wanted = min(wanted, size - 1) if others else wanted
    chosen = rng.sample(matches, wanted) + rng.sample(others, min(len(others), size - wanted))
    rng.shuffle(chosen)
    return chosen


def write_pairs(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def subsampled_folder(source: Path, target: Path, train_pairs: int, valid_pairs: int, seed: int) -> Path:
    """A DeepMatcher folder named like ``source`` (so the dataset keeps its name) holding the same tables and
    test.csv, and stratified samples of ``train_pairs`` train and ``valid_pairs`` valid pairs."""
    folder = target / source.name
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tableA.csv", "tableB.csv", "test.csv"):
        link = folder / name
        if not link.exists():
            link.symlink_to((source / name).resolve())
    rng = random.Random(seed)
    for split, size in (("train", train_pairs), ("valid", valid_pairs)):
        header, rows = read_pairs(source / f"{split}.csv")
        write_pairs(folder / f"{split}.csv", header, stratified_sample(rows, size, rng))
    return folder


def drop_weights(folder: Path) -> None:
    """Remove the weight files under a training output folder (its manifests stay, as the record of the run)."""
    for path in folder.rglob("*.safetensors"):
        path.unlink()
