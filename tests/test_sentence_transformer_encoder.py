"""The sentence-transformers encoder (the real packaged MiniLM) embeds what ``SentenceTransformer.encode`` embeds,
with batches cut by token count; a usual folder runs without importing sentence-transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from encoding.encoder import EncoderInput, l2_normalise
from encoding.sentence_folder import PlainSentenceModel, plain_layout
from encoding.sentence_transformer import (
    LibraryModel,
    LibraryOnlyModel,
    SentenceTransformerEncoder,
    packaged_minilm_path,
    sentence_text,
)

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


def library_vectors(folder: Path, records: list[EncoderInput]) -> np.ndarray:
    """What the sentence-transformers library itself gives, normalised."""
    library = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    return l2_normalise(library.encode([sentence_text(r) for r in records], batch_size=4, show_progress_bar=False))


def minilm_copy(tmp_path: Path, pooling: dict | None = None, prompt: str | None = None) -> Path:
    """The packaged MiniLM folder with its pooling configuration or default prompt changed."""
    folder = tmp_path / "model"
    shutil.copytree(packaged_minilm_path(), folder)
    if pooling is not None:
        config_path = folder / "1_Pooling" / "config.json"
        config = json.loads(config_path.read_text())
        config.update({key: False for key in config if key.startswith("pooling_mode_")}, **pooling)
        config_path.write_text(json.dumps(config))
    if prompt is not None:
        config_path = folder / "config_sentence_transformers.json"
        config = json.loads(config_path.read_text())
        config.update(prompts={"query": prompt}, default_prompt_name="query")
        config_path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("instruction", [None, "find the same product:"])
def test_same_vectors_as_sentence_transformer_encode(encoder: SentenceTransformerEncoder, instruction) -> None:
    records = [EncoderInput(instruction, text) for text in TEXTS]
    vectors = encoder.encode(records, batch_size=3)
    assert isinstance(encoder.model, PlainSentenceModel)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), encoder.dim)
    np.testing.assert_allclose(vectors, library_vectors(packaged_minilm_path(), records), atol=1e-5)


@pytest.mark.parametrize(
    ("pooling", "kind"),
    [
        ({"pooling_mode_cls_token": True}, PlainSentenceModel),
        ({"pooling_mode_max_tokens": True}, PlainSentenceModel),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, LibraryModel),
        ({"pooling_mode_mean_sqrt_len_tokens": True}, LibraryModel),
    ],
)
def test_other_poolings_give_the_library_vectors(tmp_path: Path, pooling: dict, kind: type) -> None:
    folder = minilm_copy(tmp_path, pooling=pooling)
    encoder = SentenceTransformerEncoder("copy", folder, batch_tokens=64)
    records = [EncoderInput(None, text) for text in TEXTS]
    assert isinstance(encoder.model, kind)
    np.testing.assert_allclose(encoder.encode(records, batch_size=3), library_vectors(folder, records), atol=1e-5)


def test_a_default_prompt_is_left_to_the_library(tmp_path: Path) -> None:
    folder = minilm_copy(tmp_path, prompt="query: ")
    assert plain_layout(folder) is None
    encoder = SentenceTransformerEncoder("copy", folder)
    records = [EncoderInput(None, text) for text in TEXTS[:3]]
    assert isinstance(encoder.model, LibraryOnlyModel)
    np.testing.assert_allclose(encoder.encode(records), library_vectors(folder, records), atol=1e-5)


def test_max_seq_length_override_truncates(tmp_path: Path) -> None:
    short = SentenceTransformerEncoder("short", packaged_minilm_path(), max_seq_length=8)
    records = [EncoderInput(None, TEXTS[2]), EncoderInput(None, TEXTS[2][:30])]
    library = SentenceTransformer(str(packaged_minilm_path()), device="cpu", local_files_only=True)
    library.max_seq_length = 8
    expected = l2_normalise(library.encode([r.text for r in records], show_progress_bar=False))
    np.testing.assert_allclose(short.encode(records), expected, atol=1e-5)


def test_the_usual_folder_does_not_import_sentence_transformers() -> None:
    """Every worker start pays for what it imports; the packaged model needs transformers only."""
    script = (
        "import sys\n"
        "from encoding.encoder import EncoderInput\n"
        "from encoding.sentence_transformer import SentenceTransformerEncoder, packaged_minilm_path\n"
        "SentenceTransformerEncoder('minilm', packaged_minilm_path()).encode([EncoderInput(None, 'sony tv')])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sentence_transformers', 'sklearn')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_batches_are_cut_by_token_count(encoder: SentenceTransformerEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    widths: list[tuple[int, int]] = []
    embed = encoder.model.embed

    def spy(features):
        widths.append(tuple(features["input_ids"].shape))
        return embed(features)

    monkeypatch.setattr(encoder.model, "embed", spy)
    encoder.encode([EncoderInput(None, text) for text in TEXTS * 2], batch_size=100)
    assert sum(rows for rows, _ in widths) == len(TEXTS) * 2
    assert all(rows * width <= 64 or rows == 1 for rows, width in widths), widths
    assert [width for _, width in widths] == sorted((width for _, width in widths), reverse=True)


def test_no_input_gives_empty_matrix(encoder: SentenceTransformerEncoder) -> None:
    assert encoder.encode([]).shape == (0, encoder.dim)
