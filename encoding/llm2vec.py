"""LLM2Vec: a decoder LLM made bidirectional, mean-pooled over the record text (instruction excluded)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoding.batching import default_batch_tokens, token_batches
from encoding.encoder import EncoderInput, l2_normalise

# llm2vec joins instruction and text with this string and splits on it again.
LLM2VEC_SEPARATOR = "!@#$%^&*()"


class UnsupportedModelError(ValueError):
    """The base model's architecture cannot be made bidirectional by llm2vec."""


def torch_dtype(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_llm2vec(
    model_path: str | Path,
    adapters: Sequence[str | Path] = (),
    device: str = "cpu",
    pooling_mode: str = "mean",
    max_length: int = 512,
    **model_kwargs,
):
    """``LLM2Vec.from_pretrained`` made bidirectional, with each PEFT adapter merged in order (as the LLM2Vec
    recipe stacks its MNTP and SimCSE adapters)."""
    from llm2vec import LLM2Vec
    from peft import PeftModel

    adapters = [str(path) for path in adapters]
    try:
        model = LLM2Vec.from_pretrained(
            str(model_path),
            peft_model_name_or_path=adapters[0] if adapters else None,
            merge_peft=bool(adapters),
            enable_bidirectional=True,
            pooling_mode=pooling_mode,
            max_length=max_length,
            torch_dtype=torch_dtype(device),
            **model_kwargs,
        )
    except ValueError as error:
        if "not supported yet with bidirectional" in str(error):
            raise UnsupportedModelError(
                f"{model_path}: llm2vec can make only Llama, Mistral, Gemma and Qwen2 models bidirectional ({error})"
            ) from error
        raise
    for adapter in adapters[1:]:
        _forget_merged_adapters(model.model)
        model.model = PeftModel.from_pretrained(model.model, adapter).merge_and_unload()
    _forget_merged_adapters(model.model)
    return model.to(device)


def _forget_merged_adapters(model) -> None:
    """After a merge the model is a plain one again; peft would otherwise warn when the next adapter comes."""
    if hasattr(model, "peft_config"):
        del model.peft_config


class LLM2VecEncoder:
    """``LLM2Vec.from_pretrained`` on a local folder (or hub id), with optional PEFT adapters.

    ``encode`` embeds what ``LLM2Vec.encode`` embeds for the same ``[instruction, text]`` pairs, faster:
    every text is tokenised once, in one batched call; batches are cut by token count over texts sorted by
    token length (little padding); the model runs under ``torch.inference_mode`` (bf16 on CUDA).
    """

    def __init__(
        self,
        key: str,
        model_path: str | Path,
        adapter_path: str | Path | Sequence[str | Path] | None = None,
        device: str = "cpu",
        pooling_mode: str = "mean",
        max_length: int = 512,
        batch_tokens: int | None = None,
    ):
        self.key = key
        self.device = device
        adapters = [adapter_path] if isinstance(adapter_path, (str, Path)) else list(adapter_path or ())
        self.model = load_llm2vec(model_path, adapters, device, pooling_mode, max_length)
        self.model.eval()
        self.dim = int(self.model.model.config.hidden_size)
        self.batch_tokens = batch_tokens or default_batch_tokens(device)

    def encode(self, inputs: Sequence[EncoderInput], batch_size: int = 8) -> np.ndarray:
        """Embed ``[instruction, text]`` pairs; a text without tokens is the zero vector (similar to nothing).

        ``batch_size`` caps the rows of a forward pass, ``batch_tokens`` its padded tokens."""
        import torch

        vectors = np.zeros((len(inputs), self.dim), dtype=np.float32)
        tokens = tokenize(self.model, inputs)
        # llm2vec pools a text without tokens over the whole row (or fails on an all-empty batch): skip them.
        keep = [i for i, pooled in enumerate(tokens.pooled) if pooled > 0]
        lengths = [len(tokens.input_ids[i]) for i in keep]
        with torch.inference_mode():
            for batch in token_batches(lengths, self.batch_tokens, batch_size):
                rows = [keep[j] for j in batch]
                vectors[rows] = self._embed([tokens.input_ids[i] for i in rows], [tokens.pooled[i] for i in rows])
        return l2_normalise(np.nan_to_num(vectors, nan=0.0))

    def _embed(self, input_ids: list[list[int]], pooled: list[int]) -> np.ndarray:
        """One forward pass over left-padded rows, pooled as llm2vec pools (the last ``pooled`` tokens)."""
        import torch

        width = max(len(ids) for ids in input_ids)
        pad_id = self.model.tokenizer.pad_token_id or 0
        ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(input_ids), width), dtype=torch.long)
        embed = torch.zeros((len(input_ids), width), dtype=torch.long)
        for row, (row_ids, count) in enumerate(zip(input_ids, pooled, strict=True)):
            ids[row, width - len(row_ids) :] = torch.tensor(row_ids, dtype=torch.long)
            attention[row, width - len(row_ids) :] = 1
            embed[row, width - count :] = 1
        ids, attention = ids.to(self.device), attention.to(self.device)
        hidden = self.model.model(input_ids=ids, attention_mask=attention).last_hidden_state
        if self.model.pooling_mode == "mean":
            weights = embed.to(self.device, torch.float32).unsqueeze(-1)
            pooled_vectors = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1)
        else:  # llm2vec's own pooling for the other modes
            features = {"input_ids": ids, "attention_mask": attention, "embed_mask": embed.to(self.device)}
            pooled_vectors = self.model.get_pooling(features, hidden)
        return pooled_vectors.float().cpu().numpy()


@dataclass(frozen=True)
class Tokenized:
    """Token ids of each ``instruction + text`` (as llm2vec joins them), and how many of its last tokens
    are the text's, which pooling averages (0: an empty text, embedded as the zero vector)."""

    input_ids: list[list[int]]
    pooled: list[int]


def tokenize(model, inputs: Sequence[EncoderInput]) -> Tokenized:
    """What ``LLM2Vec.encode`` tokenises for these inputs, in two batched tokenizer calls.

    Same strings (``_convert_to_str`` and ``prepare_for_tokenization``, split on the separator as
    ``LLM2Vec.tokenize`` splits), same truncation to ``max_length``, same count of pooled text tokens."""
    if not inputs:
        return Tokenized([], [])
    tokenizer = model.tokenizer
    pairs, cuts = _pairs_and_cuts(model, inputs)
    joined = []
    for (instruction, text), cut in zip(pairs, cuts, strict=True):
        # A cut text goes through llm2vec's own word truncation, exactly as LLM2Vec.encode would.
        string = model._convert_to_str(instruction, text) if cut else _join(instruction, text)
        joined.append(model.prepare_for_tokenization(string))
    parts = [string.split(LLM2VEC_SEPARATOR) for string in joined]
    full = tokenizer(["".join(p) for p in parts], truncation=True, max_length=model.max_length)["input_ids"]
    texts = [p[1] if len(p) > 1 else "" for p in parts]
    text_ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=model.max_length)["input_ids"]
    pooled = [
        min(len(own), len(ids)) if text.strip() else 0
        for own, ids, (_, text) in zip(text_ids, full, pairs, strict=True)
    ]
    return Tokenized([list(ids) for ids in full], pooled)


def _join(instruction: str, text: str) -> str:
    """``LLM2Vec._convert_to_str`` for a text within ``doc_max_length`` tokens."""
    return f"{instruction.strip()} {LLM2VEC_SEPARATOR}{text}" if instruction else f"{LLM2VEC_SEPARATOR}{text}"


def instruction_text_pairs(model, inputs: Sequence[EncoderInput]) -> list[list[str]]:
    """The ``[instruction, text]`` pairs handed to llm2vec, separator removed and text cut to length."""
    return _pairs_and_cuts(model, inputs)[0]


def _pairs_and_cuts(model, inputs: Sequence[EncoderInput]) -> tuple[list[list[str]], list[bool]]:
    """The pairs, and whether each text was cut to ``doc_max_length`` tokens (one batched tokenizer call).

    llm2vec itself cuts by whitespace-separated words, which empties a long text without spaces: cut by
    token offsets first."""
    texts = [_clean(item.text) for item in inputs]
    limit = model.doc_max_length
    offsets = (
        model.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"] if texts else []
    )
    cuts = [len(spans) > limit for spans in offsets]
    cut_texts = [
        text[: spans[limit - 1][1]] if cut else text for text, spans, cut in zip(texts, offsets, cuts, strict=True)
    ]
    pairs = [[_clean(item.instruction or ""), text] for item, text in zip(inputs, cut_texts, strict=True)]
    return pairs, cuts


def tokenizer_inputs(model, inputs: Sequence[EncoderInput]) -> list[str]:
    """The strings ``LLM2Vec.encode`` tokenizes for these inputs; training feeds the same strings."""
    return [
        model.prepare_for_tokenization(model._convert_to_str(instruction, text))
        for instruction, text in instruction_text_pairs(model, inputs)
    ]


def _clean(text: str) -> str:
    """Remove llm2vec's internal separator, which would split the text in the wrong place."""
    return text.replace(LLM2VEC_SEPARATOR, " ")
