"""Test labels choose nothing: permuting the labels of test.csv changes no selection, only the test figures.

Each check runs the real command twice, on a benchmark and on a copy whose test.csv labels are shuffled (same
pairs, same number of matches), and compares what was chosen: the grid configuration and the threshold
(`llmatch evaluate --grid`), the probability mapping, the identifier weight (`llmatch train --stages
identifiers`), the training checkpoint (the supervised stage on a tiny LLM2Vec model) and the identifier-rule
ablation (`python -m evaluation.ablation`).
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
from separable import write_separable_benchmark
from tiny_llama import build_tiny_llama

from encoding.manifest import read_manifest
from evaluation import ablation
from llmatch.cli import main

SMALL = Path(__file__).resolve().parent / "data" / "abt_buy_small"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMATCH_DATA_DIR", str(tmp_path / "data"))
    from llmatch.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def permuted_copies(source: Path, root: Path) -> tuple[Path, Path]:
    """Two copies of a benchmark under the same folder name: as it is, and with its test labels shuffled."""
    original, permuted = root / "original" / source.name, root / "permuted" / source.name
    shutil.copytree(source, original)
    shutil.copytree(source, permuted)
    with (source / "test.csv").open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    labels = [row[2] for row in rows]
    shuffled = labels[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != labels and sorted(shuffled) == sorted(labels)
    with (permuted / "test.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *([*row[:2], label] for row, label in zip(rows, shuffled, strict=True))])
    return original, permuted


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_grid_threshold_and_probabilities_are_chosen_on_valid_only(env, tmp_path):
    original, permuted = permuted_copies(SMALL, tmp_path)
    reports = {}
    for name, folder in (("original", original), ("permuted", permuted)):
        out = tmp_path / f"out-{name}"
        assert main(["evaluate", str(folder), "--grid", "--paired-only", "--out", str(out)]) == 0
        reports[name] = json.loads((out / "report.json").read_text())
    report, shuffled = reports["original"], reports["permuted"]

    tried = report["tried"]
    assert {(t["config"]["serialization"], t["config"]["instruction"]) for t in tried} == {
        (s, i)
        for s in ("tagged", "plain")
        for i in (
            "Represent the text for finding another product description for the same product",
            "Retrieve semantically similar text",
        )
    }
    best = max(tried, key=lambda t: t["valid"]["f1"])
    assert report["config"] == best["config"] and report["test"] == best["test"]
    # Each configuration embeds its own texts (the cache serves only records whose text repeats within it).
    assert all(t["encoding"]["from_cache"] < t["encoding"]["records"] / 2 for t in tried)

    # Every choice is the same: configuration, each configuration's threshold, probability mapping, valid figures.
    assert shuffled["config"] == report["config"]
    for mine, theirs in zip(tried, shuffled["tried"], strict=True):
        assert theirs["config"] == mine["config"] and theirs["valid"] == pytest.approx(mine["valid"], abs=1e-9)
        assert theirs["threshold"] == pytest.approx(mine["threshold"], abs=1e-6)
        assert theirs["calibration"]["method"] == mine["calibration"]["method"]
    # Same valid scores, probabilities and decisions; on test the same too, with other labels.
    for split in ("valid", "test"):
        rows = [read_rows(tmp_path / f"out-{name}" / f"{split}_pairs.csv") for name in reports]
        for column in ("score", "probability"):
            values = [[float(r[column]) for r in side] for side in rows]
            assert values[0] == pytest.approx(values[1], abs=2e-6)
        assert [r["decision"] for r in rows[0]] == [r["decision"] for r in rows[1]]
        same_labels = [r["label"] for r in rows[0]] == [r["label"] for r in rows[1]]
        assert same_labels == (split == "valid")
    assert shuffled["test"] != report["test"]
    assert shuffled["calibration"]["test"] != report["calibration"]["test"]


def test_identifier_weight_and_rule_ablation_are_chosen_on_valid_only(env, tmp_path, capsys):
    original, permuted = permuted_copies(SMALL, tmp_path)
    selections, ablations = [], []
    for name, folder in (("original", original), ("permuted", permuted)):
        out = tmp_path / f"trained-{name}"
        assert main(["train", str(folder), "--base", "minilm", "--stages", "identifiers", "--out", str(out)]) == 0
        stage = read_manifest(out / "identifiers")["stages"][-1]
        selections.append((stage["identifier_weights"], read_manifest(out / "identifiers")["encoder"]))
        capsys.readouterr()
        assert ablation.main([str(folder), "--out", str(tmp_path / f"ablation-{name}.json")]) == 0
        ablations.append(json.loads((tmp_path / f"ablation-{name}.json").read_text())["rows"])
    assert selections[0] == selections[1]
    assert max(row["valid_f1"] for row in selections[0][0]) > selections[0][0][0]["valid_f1"], "a weight was chosen"
    assert ablations[0] == ablations[1]
    assert len(ablations[0]) == len(ablation.VARIANTS)


def test_training_checkpoint_is_chosen_on_valid_only(env, tmp_path):
    benchmark = write_separable_benchmark(tmp_path / "source" / "separable", lefts=40)
    original, permuted = permuted_copies(benchmark, tmp_path)
    tiny = build_tiny_llama(tmp_path / "tiny")
    runs = []
    for name, folder in (("original", original), ("permuted", permuted)):
        out = tmp_path / f"trained-{name}"
        arguments = ["train", str(folder), "--base", str(tiny), "--stages", "supervised", "--out", str(out)]
        options = ["--max-steps", "6", "--eval-every", "2", "--batch-size", "8", "--max-length", "64"]
        assert main([*arguments, *options, "--learning-rate", "1e-3", "--lora-rank", "8"]) == 0
        stage = read_manifest(out / "supervised")["stages"][-1]
        weights = sorted(p for p in (out / "supervised").iterdir() if p.suffix == ".safetensors")
        runs.append((stage["evaluations"], stage.get("best_step"), [p.read_bytes() for p in weights]))
    assert len(runs[0][0]) >= 3, "several checkpoints were compared"
    assert runs[0] == runs[1]
    assert runs[0][2], "the kept weights were written"
