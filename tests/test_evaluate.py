"""`llmatch evaluate` on a small DeepMatcher slice: reports, figures, valid-only selection, bad folders."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from evaluation import deepmatcher, errors, mappings, summarize
from llmatch.cli import main

SMALL = Path(__file__).resolve().parent / "data" / "abt_buy_small"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMATCH_DATA_DIR", str(tmp_path / "data"))
    from llmatch.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_evaluate_writes_report_markdown_and_figure(env, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["evaluate", str(SMALL), "--out", str(out), "--serialization", "plain"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "abt_buy_small"
    assert report["config"] == {"encoder": "minilm", "serialization": "plain", "instruction": None}
    for split in ("valid", "test"):
        assert set(report[split]) == {"precision", "recall", "f1"}
        assert 0.0 < report[split]["f1"] <= 1.0
    recall = report["blocking"]["recall_at_k"]
    assert list(recall) == ["1", "5", "10", "20", "50"]
    assert [recall[k] for k in recall] == sorted(recall.values()), "recall@k grows with k"
    assert report["blocking"]["candidates"]["10"] == 10 * report["blocking"]["queries"]
    assert report["encoding"]["records"] == 197 + 201 and report["encoding"]["records_per_second"] > 0
    assert (out / f"{report['dataset']}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| test |" in (out / "report.md").read_text()
    assert "Threshold chosen on valid" in capsys.readouterr().out

    rows, outcomes = {}, {}
    for split in ("valid", "test"):
        with (out / f"{split}_pairs.csv").open() as handle:
            rows[split] = list(csv.DictReader(handle))
        assert len(rows[split]) == report["pairs"][split]
        assert all((float(r["score"]) >= report["threshold"]) == (r["decision"] == "1") for r in rows[split])
        outcomes[split] = Counter(r["outcome"] for r in rows[split])
        counts = outcomes[split]
        assert counts["true match"] + counts["missed match"] == sum(r["label"] == "1" for r in rows[split])
        precision = counts["true match"] / (counts["true match"] + counts["false match"])
        assert precision == pytest.approx(report[split]["precision"])

    for arguments, split in (([], "valid"), (["--split", "test"], "test")):  # errors are read on valid by default
        assert errors.main([str(SMALL), str(out), *arguments, "--show", "missed match", "--limit", "1"]) == 0
        printed = capsys.readouterr().out.splitlines()
        counted = {line.split(" | ")[0].strip("| "): int(line.split(" | ")[1]) for line in printed[2:6]}
        assert counted == {outcome: outcomes[split][outcome] for outcome in errors.OUTCOMES}
    assert outcomes["valid"] != outcomes["test"]

    # The probabilities are those GET /match answers; their calibration error is recomputed from test_pairs.csv.
    calibration = report["calibration"]
    assert calibration["method"] in ("platt", "isotonic") and calibration["bins"] == 15
    probabilities = np.array([float(r["probability"]) for r in rows["test"]])
    labels = np.array([int(r["label"]) for r in rows["test"]])
    assert ((0 <= probabilities) & (probabilities <= 1)).all()
    assert calibration["test"]["brier"] == pytest.approx(np.mean((probabilities - labels) ** 2), abs=1e-5)
    bins = np.minimum((probabilities * 15).astype(int), 14)
    ece = sum(
        np.sum(bins == b) / len(labels) * abs(probabilities[bins == b].mean() - labels[bins == b].mean())
        for b in np.unique(bins)
    )
    assert calibration["test"]["ece"] == pytest.approx(ece, abs=1e-5)
    assert (out / f"{report['dataset']}-reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "expected calibration error" in (out / "report.md").read_text()
    assert mappings.main([str(out)]) == 0  # each mapping refitted on valid_pairs.csv: the service's choice again
    compared = capsys.readouterr().out.splitlines()[2].split(" | ")
    assert compared[0] == f"| {out.name}" and compared[5] == calibration["method"]
    kept = 1 if calibration["method"] == "platt" else 3
    assert float(compared[kept]) == pytest.approx(calibration["test"]["ece"], abs=6e-4)

    summary = summarize.table([out / "report.json"]).splitlines()
    assert len(summary) == 3 and summary[0].count("|") == summary[2].count("|")
    assert f"**{report['test']['f1']:.3f}**" in summary[2]


def test_error_reading_compares_identifier_codes() -> None:
    sony = errors.codes({"name": "Sony Handycam HDR-SR10", "price": "499.00", "note": "new model"})
    assert sony == {"hdrsr10"}, "a code mixes letters and digits; prices and words are not codes"
    assert errors.codes({"title": "ampad file folders 35113", "price": "12.94"}) == {"35113"}  # a catalogue number
    assert errors.agreement(sony, errors.codes({"title": "sony hdrsr10 camcorder"})) == "share a code"
    assert errors.agreement(sony, errors.codes({"title": "sony hdr-ux10"})) == "codes differ"
    assert errors.agreement(sony, errors.codes({"title": "sony camcorder"})) == "no code on one side"


def test_missing_file_is_a_clear_error(env, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(SMALL, broken)
    (broken / "test.csv").unlink()
    assert main(["evaluate", str(broken)]) == 2
    assert "lacks test.csv" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("file", "line", "message"),
    [
        ("valid.csv", "1,2,yes\n", "is not 0 or 1"),
        ("test.csv", "1,999999,0\n", "missing from tableA.csv or tableB.csv"),
        ("tableA.csv", "5,only two\n", "fields, the header has"),
    ],
)
def test_malformed_files_are_clear_errors(tmp_path, file, line, message):
    broken = tmp_path / "broken"
    shutil.copytree(SMALL, broken)
    with (broken / file).open("a") as handle:
        handle.write(line)
    with pytest.raises(deepmatcher.DatasetError, match=message):
        deepmatcher.load(broken)


def test_pair_referenced_subset_is_flagged(tmp_path):
    subset = tmp_path / "subset"
    shutil.copytree(SMALL, subset)
    benchmark = deepmatcher.load(subset)
    referenced = {p.right_id for pairs in benchmark.splits.values() for p in pairs}
    lines = (subset / "tableB.csv").read_text().splitlines(keepends=True)
    kept = [lines[0]] + [line for line in lines[1:] if line.split(",", 1)[0] in referenced]
    (subset / "tableB.csv").write_text("".join(kept))
    assert deepmatcher.load(SMALL).subset_note is None
    assert "pair-referenced subset" in deepmatcher.load(subset).subset_note


def test_paired_only_keeps_match_figures_and_flags_blocking(env, tmp_path):
    full, paired = tmp_path / "full", tmp_path / "paired"
    assert main(["evaluate", str(SMALL), "--out", str(full)]) == 0
    assert main(["evaluate", str(SMALL), "--paired-only", "--out", str(paired)]) == 0
    full_report, paired_report = (json.loads((out / "report.json").read_text()) for out in (full, paired))
    benchmark = deepmatcher.load(SMALL)
    referenced = {p.right_id for p in benchmark.valid + benchmark.test}
    assert paired_report["encoding"]["records"] < full_report["encoding"]["records"]
    assert paired_report["blocking"]["table_b_records"] == len(referenced)
    assert "--paired-only" in paired_report["blocking"]["note"] and full_report["blocking"]["note"] is None
    assert paired_report["threshold"] == pytest.approx(full_report["threshold"], abs=1e-6)
    for split in ("valid", "test"):
        assert paired_report[split] == pytest.approx(full_report[split], abs=1e-6)
