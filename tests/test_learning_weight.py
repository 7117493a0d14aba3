"""A training job chooses the identifier weight before training, on every label scored by the base encoder (which
trained on none of them): checked against a direct count over the real MiniLM on the small benchmark."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from encoding.identifiers import combine, identifier_vectors
from encoding.registry import load_encoder
from learning.train_job import choose_identifier_weight
from llmatch.settings import Settings
from training import data as training_data
from training.command import resolve_base

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
