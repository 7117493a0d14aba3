"""LLM2VecEncoder on a tiny random Llama (and on SmolLM2 when converted): what it embeds, and that it embeds
exactly what ``llm2vec.LLM2Vec.encode`` embeds for the same pairs."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_llama import HIDDEN_SIZE, build_tiny_llama, build_tiny_non_llama

from encoding.batching import token_batches
from encoding.encoder import EncoderInput, l2_normalise
from encoding.llm2vec import (
    LLM2VEC_SEPARATOR,
    LLM2VecEncoder,
    UnsupportedModelError,
    instruction_text_pairs,
    tokenize,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TITLES = ["[name] sony tv [\\name]", "[name] canon eos r6 camera [\\name]", "dell xps 13 laptop 16gb ram"]
INSTRUCTION = "represent the product for retrieving duplicate products:"


def inputs(texts: list[str], instruction: str | None = None) -> list[EncoderInput]:
    """One EncoderInput per text, all with the same instruction."""
    return [EncoderInput(instruction, text) for text in texts]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module")
def encoder(tiny_folder: Path) -> LLM2VecEncoder:
    return LLM2VecEncoder("tiny", tiny_folder)


def test_encodes_unit_float32_rows(encoder: LLM2VecEncoder) -> None:
    vectors = encoder.encode(inputs(TITLES))
    assert type(encoder.model.model).__name__ == "LlamaBiModel"
    assert encoder.dim == HIDDEN_SIZE
    assert vectors.dtype == np.float32 and vectors.shape == (len(TITLES), HIDDEN_SIZE)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_encoding_is_deterministic(encoder: LLM2VecEncoder) -> None:
    np.testing.assert_array_equal(encoder.encode(inputs(TITLES)), encoder.encode(inputs(TITLES)))


def test_no_input_gives_empty_matrix(encoder: LLM2VecEncoder) -> None:
    assert encoder.encode([]).shape == (0, HIDDEN_SIZE)


def test_instruction_changes_the_vector(encoder: LLM2VecEncoder) -> None:
    first = encoder.encode(inputs(TITLES[:1], "find duplicate products:"))
    second = encoder.encode(inputs(TITLES[:1], "classify the product category:"))
    plain = encoder.encode(inputs(TITLES[:1]))
    assert not np.allclose(first, second, atol=1e-3)
    assert not np.allclose(first, plain, atol=1e-3)


def test_instruction_is_attended_but_not_pooled(encoder: LLM2VecEncoder) -> None:
    tokenizer, model = encoder.model.tokenizer, encoder.model.model
    text = TITLES[0]
    joined = tokenizer([f"{INSTRUCTION} {text}"], return_tensors="pt")
    n_text = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        hidden = model(**joined).last_hidden_state[0]
    text_mean = hidden[-n_text:].mean(dim=0).numpy()
    all_mean = hidden.mean(dim=0).numpy()
    vector = encoder.encode(inputs([text], INSTRUCTION))[0]
    np.testing.assert_allclose(vector, text_mean / np.linalg.norm(text_mean), atol=1e-5)
    assert not np.allclose(vector, all_mean / np.linalg.norm(all_mean), atol=1e-3)


def test_separator_in_text_is_replaced_by_a_space(encoder: LLM2VecEncoder) -> None:
    with_separator = f"[name] sony{LLM2VEC_SEPARATOR}tv [\\name]"
    vectors = encoder.encode(inputs([with_separator, TITLES[0]], INSTRUCTION))
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)


def test_empty_text_next_to_other_texts_is_zero(encoder: LLM2VecEncoder) -> None:
    vectors = encoder.encode(inputs(["", *TITLES]))
    assert np.isfinite(vectors).all()
    np.testing.assert_array_equal(vectors[0], 0.0)
    np.testing.assert_allclose(np.linalg.norm(vectors[1:], axis=1), 1.0, atol=1e-5)


def test_empty_text_alone_is_zero(encoder: LLM2VecEncoder) -> None:
    vectors = encoder.encode(inputs([""]))
    np.testing.assert_array_equal(vectors, np.zeros((1, HIDDEN_SIZE), dtype=np.float32))


def test_empty_text_with_instruction_is_zero(encoder: LLM2VecEncoder) -> None:
    vectors = encoder.encode(inputs(["", TITLES[0]], INSTRUCTION))
    np.testing.assert_array_equal(vectors[0], 0.0)


def test_long_text_without_spaces_keeps_its_content(encoder: LLM2VecEncoder) -> None:
    vectors = encoder.encode(inputs(["-" * 450, "=" * 450, TITLES[0]]))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_lora_adapter_folder_matches_in_memory_merge(tiny_folder: Path, tmp_path: Path) -> None:
    records = inputs(TITLES, INSTRUCTION)
    base = LLM2VecEncoder("base", tiny_folder)
    base_vectors = base.encode(records)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(base.model.model, lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    base.model.model = peft_model.merge_and_unload()
    merged_vectors = base.encode(records)

    loaded = LLM2VecEncoder("lora", tiny_folder, adapter_path=tmp_path / "adapter")
    loaded_vectors = loaded.encode(records)
    assert not np.allclose(loaded_vectors, base_vectors, atol=1e-3)
    np.testing.assert_allclose(loaded_vectors, merged_vectors, atol=1e-5)


def test_unsupported_architecture_raises_clear_error(tmp_path: Path) -> None:
    folder = build_tiny_non_llama(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="Llama, Mistral, Gemma and Qwen2"):
        LLM2VecEncoder("gpt2", folder)


def smollm2_folder() -> Path:
    """Where the converted SmolLM2 model is expected: ``$LLMATCH_SMOLLM2_DIR`` or the default data folder."""
    configured = os.environ.get("LLMATCH_SMOLLM2_DIR")
    return Path(configured) if configured else REPO_ROOT / ".data" / "models" / "smollm2-135m-instruct"


@pytest.mark.skipif(
    not (smollm2_folder() / "config.json").is_file(),
    reason="converted SmolLM2 not found (run `python -m encoding.smollm2` or set LLMATCH_SMOLLM2_DIR)",
)
def test_smollm2_near_duplicates_score_higher() -> None:
    encoder = LLM2VecEncoder("smollm2", smollm2_folder())
    left = ["Sony Bravia KD-55X85J 55 inch 4K Ultra HD Smart LED TV", "Canon EOS R6 Mirrorless Camera Body"]
    right = ["Sony KD55X85J 55in 4K UHD Smart TV (2021)", "Canon EOS R6 Full-Frame Mirrorless Camera (Body)"]
    vectors = encoder.encode(inputs(left + right))
    assert encoder.dim == 576 and vectors.shape == (4, 576)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors[:2] @ vectors[2:].T
    assert similarity[0, 0] > similarity[0, 1]
    assert similarity[1, 1] > similarity[1, 0]


# --- the worker's path embeds what LLM2Vec.encode embeds -------------------------------------------------------

MIXED = [
    "[name] sony tv [\\name]",
    "canon eos r6 mirrorless camera body only " * 12,
    "dell xps 13 laptop intel core i7 16gb ram 512gb ssd",
    "x" * 40 + " y" * 450,  # past doc_max_length: llm2vec's own word truncation applies
    "a",
    "lenovo thinkpad x1 carbon gen 9, 14 inch, 1tb",
]


def library_vectors(encoder: LLM2VecEncoder, records: list[EncoderInput], batch_size: int = 4) -> np.ndarray:
    """``LLM2Vec.encode`` on the pairs the worker hands it, L2-normalised."""
    pairs = instruction_text_pairs(encoder.model, records)
    vectors = encoder.model.encode(pairs, batch_size=batch_size, show_progress_bar=False, device="cpu")
    return l2_normalise(vectors.float().numpy())


@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
def test_same_vectors_as_llm2vec_encode(tiny_folder: Path, instruction: str | None) -> None:
    encoder = LLM2VecEncoder("tiny", tiny_folder, batch_tokens=64)
    records = inputs(MIXED, instruction)
    np.testing.assert_allclose(encoder.encode(records, batch_size=3), library_vectors(encoder, records), atol=1e-5)


def test_same_vectors_as_llm2vec_encode_with_weighted_mean_pooling(tiny_folder: Path) -> None:
    encoder = LLM2VecEncoder("tiny", tiny_folder, pooling_mode="weighted_mean", batch_tokens=64)
    records = inputs(MIXED, INSTRUCTION)
    np.testing.assert_allclose(encoder.encode(records, batch_size=3), library_vectors(encoder, records), atol=1e-5)


def test_batches_are_cut_by_token_count(tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = LLM2VecEncoder("tiny", tiny_folder, batch_tokens=48)
    shapes: list[tuple[int, int]] = []
    embed = encoder._embed

    def spy(input_ids: list[list[int]], pooled: list[int]) -> np.ndarray:
        shapes.append((len(input_ids), max(len(ids) for ids in input_ids)))
        return embed(input_ids, pooled)

    monkeypatch.setattr(encoder, "_embed", spy)
    records = inputs(MIXED * 3, INSTRUCTION)
    lengths = sorted((len(ids) for ids in tokenize(encoder.model, records).input_ids), reverse=True)
    encoder.encode(records, batch_size=100)
    assert sum(rows for rows, _ in shapes) == len(records)
    assert all(rows * width <= 48 or rows == 1 for rows, width in shapes), shapes
    assert [width for _, width in shapes] == sorted((width for _, width in shapes), reverse=True)
    assert shapes[0][1] == lengths[0] and len(shapes) < len(records)  # longest first; short rows share batches


def test_token_batches_cover_every_index_once_within_the_budget() -> None:
    lengths = [5, 30, 12, 12, 1, 50, 7]
    batches = token_batches(lengths, max_tokens=30, max_rows=3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches[0] == [5]  # longer than the budget: alone
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 30
    with pytest.raises(ValueError):
        token_batches(lengths, max_tokens=0, max_rows=3)


@pytest.mark.skipif(not (smollm2_folder() / "config.json").is_file(), reason="converted SmolLM2 not found")
def test_smollm2_same_vectors_as_llm2vec_encode() -> None:
    """Rendered benchmark records (when the shared datasets are there) or the test titles, with an instruction."""
    table = REPO_ROOT.parent / "shared" / "datasets" / "abt_buy" / "tableB.csv"
    texts = [*TITLES, *MIXED[:3]]
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))[:24]
        texts += [" ".join(f"[{k}] {v} [\\{k}]" for k, v in row.items() if k != "id" and v) for row in rows]
    encoder = LLM2VecEncoder("smollm2", smollm2_folder(), batch_tokens=512)
    records = inputs(texts, INSTRUCTION)
    np.testing.assert_allclose(encoder.encode(records, batch_size=16), library_vectors(encoder, records), atol=1e-4)
