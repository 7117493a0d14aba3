"""The sentence-transformers encoder (the real packaged MiniLM) embeds what ``SentenceTransformer.encode`` embeds,
with batches cut by token count."""

from __future__ import annotations

import numpy as np
import pytest

from encoder_worker.encoders.base import EncoderInput, l2_normalise
from encoder_worker.encoders.sentence_transformer import SentenceTransformerEncoder, packaged_minilm_path, sentence_text

TEXTS = [
    "[name] sony tv [\\name]",
    "  Canon EOS R6 Mirrorless Camera Body  ",
    "dell xps 13 laptop intel core i7 16gb ram 512gb ssd " * 40,  # past max_seq_length: truncated
    "",
    "a",
    "lenovo thinkpad x1 carbon gen 9, 14 inch, 1tb",
]


@pytest.fixture(scope="module")
def encoder() -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder("minilm", packaged_minilm_path(), batch_tokens=64)


@pytest.mark.parametrize("instruction", [None, "find the same product:"])
def test_same_vectors_as_sentence_transformer_encode(encoder: SentenceTransformerEncoder, instruction) -> None:
    records = [EncoderInput(instruction, text) for text in TEXTS]
    expected = encoder.model.encode([sentence_text(r) for r in records], batch_size=4, show_progress_bar=False)
    vectors = encoder.encode(records, batch_size=3)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), encoder.dim)
    np.testing.assert_allclose(vectors, l2_normalise(expected), atol=1e-5)


def test_batches_are_cut_by_token_count(encoder: SentenceTransformerEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    widths: list[tuple[int, int]] = []
    model = encoder.model

    class Spy:
        def __getitem__(self, index):
            return model[index]

        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, features):
            widths.append(tuple(features["input_ids"].shape))
            return model(features)

    monkeypatch.setattr(encoder, "model", Spy())
    encoder.encode([EncoderInput(None, text) for text in TEXTS * 2], batch_size=100)
    assert sum(rows for rows, _ in widths) == len(TEXTS) * 2
    assert all(rows * width <= 64 or rows == 1 for rows, width in widths), widths
    assert [width for _, width in widths] == sorted((width for _, width in widths), reverse=True)


def test_no_input_gives_empty_matrix(encoder: SentenceTransformerEncoder) -> None:
    assert encoder.encode([]).shape == (0, encoder.dim)
