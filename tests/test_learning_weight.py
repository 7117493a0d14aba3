"""A training job chooses the identifier weight before training, on every label scored by the base encoder (which
trained on none of them), until its held-out fold holds enough matches to choose it after training: checked
against a direct count over the real MiniLM on the small benchmark."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from encoding.identifiers import combine, identifier_vectors
from encoding.manifest import read_manifest
from encoding.registry import load_encoder
from encoding.versions import SERVING_STAGE
from learning import train_job
from learning.train_job import choose_identifier_weight
from llmatch.settings import Settings
from training import data as training_data
from training.command import parse_weights, resolve_base
from training.stages import best_identifier_weight

SMALL = Path(__file__).parent / "data" / "abt_buy_small"
WEIGHTS = (0.0, 0.1, 0.3, 0.5)


def direct_average_precision(data: training_data.TrainingData, spec, weight: float) -> float:
    """Average precision of the base encoder's cosine at ``weight`` over the pairs of both splits."""
    pairs = data.pairs("train") + data.pairs("valid")
    keys = sorted({key for pair in pairs for key in (pair.left, pair.right)})
    dense = load_encoder(replace(spec, identifier_weight=0.0), "cpu").encode([data.inputs[key] for key in keys])
    rows = combine(dense, identifier_vectors([data.inputs[key].text for key in keys]), weight) if weight else dense
    index = {key: i for i, key in enumerate(keys)}
    scores = np.sum(rows[[index[p.left] for p in pairs]] * rows[[index[p.right] for p in pairs]], axis=1)
    return float(average_precision_score([p.label for p in pairs], scores))


def test_the_identifier_weight_is_chosen_on_every_label_by_the_base_encoder(tmp_path: Path) -> None:
    data = training_data.load([SMALL], "tagged", None)
    assert data.pairs("train") and data.pairs("valid")
    base = resolve_base("minilm", Settings(data_dir=tmp_path))

    chosen, rows = choose_identifier_weight(base, data, WEIGHTS, "cpu")

    expected = [round(direct_average_precision(data, base.spec, weight), 4) for weight in WEIGHTS]
    assert [float(weight) for weight in rows] == list(WEIGHTS)
    assert list(rows.values()) == pytest.approx(expected, abs=2e-4)
    assert chosen == WEIGHTS[int(np.argmax(expected))]  # the first of equals: the smallest weight
    held_out_only = training_data.TrainingData(data.names, data.serialization, data.instruction, data.inputs)
    held_out_only.splits["valid"] = data.splits["valid"]
    _, fold_rows = choose_identifier_weight(base, held_out_only, WEIGHTS, "cpu")
    assert fold_rows != rows


class QuietHandle:
    """The job's progress reports, dropped (no job row behind this training)."""

    def report(self, force: bool = False, **values) -> None:
        pass

    def progress(self, start: float, end: float):
        return lambda done, total: None


def test_a_job_chooses_the_weight_on_its_held_out_fold_after_training_once_the_fold_holds_enough_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The small benchmark's held-out fold (valid.csv) holds 20 matches, under the default bar (30: the end-to-end
    job test covers that path); with the bar at 20 the serving stage chooses among every candidate weight on the
    fold, after training, and nothing is chosen on every label."""
    data = training_data.load([SMALL], "tagged", None)
    assert sum(pair.label for pair in data.pairs("valid")) == 20 < train_job.FOLD_CHOOSES_WEIGHT_FROM_MATCHES
    monkeypatch.setattr(train_job, "FOLD_CHOOSES_WEIGHT_FROM_MATCHES", 20)
    folder = tmp_path / "version"

    trained = train_job.train_version("minilm", data, folder, Settings(data_dir=tmp_path), "cpu", QuietHandle())

    manifest = read_manifest(folder / SERVING_STAGE)
    rows = manifest["stages"][-1]["identifier_weights"]
    served = manifest["encoder"]["identifier_weight"]
    assert trained["identifier_weight_chosen_on"] == "fold" and trained["identifier_weight"] == served
    assert trained["labels_average_precision_by_identifier_weight"] is None
    candidates = parse_weights(train_job.recipe_arguments(1).identifier_weights)
    assert [row["weight"] for row in rows] == list(candidates) and len(candidates) > 1
    assert served == best_identifier_weight(rows, train_job.SELECTION_METRIC)["weight"]
