"""LLM2Vec: a decoder LLM made bidirectional, mean-pooled over the record text (instruction excluded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from encoder_worker.encoders.base import EncoderInput, l2_normalise

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
                f"{model_path}: llm2vec can make only Llama, Mistral, Gemma and Qwen2 models "
                f"bidirectional ({error})"
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
    """``LLM2Vec.from_pretrained`` on a local folder (or hub id), with optional PEFT adapters."""

    def __init__(
        self,
        key: str,
        model_path: str | Path,
        adapter_path: str | Path | Sequence[str | Path] | None = None,
        device: str = "cpu",
        pooling_mode: str = "mean",
        max_length: int = 512,
    ):
        self.key = key
        self.device = device
        adapters = [adapter_path] if isinstance(adapter_path, (str, Path)) else list(adapter_path or ())
        self.model = load_llm2vec(model_path, adapters, device, pooling_mode, max_length)
        self.model.eval()
        self.dim = int(self.model.model.config.hidden_size)

    def encode(self, inputs: Sequence[EncoderInput], batch_size: int = 8) -> np.ndarray:
        """Embed ``[instruction, text]`` pairs; a text without tokens is the zero vector (similar to nothing)."""
        vectors = np.zeros((len(inputs), self.dim), dtype=np.float32)
        pairs = instruction_text_pairs(self.model, inputs)
        # llm2vec pools a text without tokens over the whole row (or fails on an all-empty batch): skip them.
        keep = [i for i, (_, text) in enumerate(pairs) if text.strip()]
        if keep:
            vectors[keep] = self.model.encode(
                [pairs[i] for i in keep], batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True,
                device=self.device,
            )
        return l2_normalise(np.nan_to_num(vectors, nan=0.0))


def instruction_text_pairs(model, inputs: Sequence[EncoderInput]) -> list[list[str]]:
    """The ``[instruction, text]`` pairs handed to llm2vec, separator removed and text cut to length."""
    return [[_clean(item.instruction or ""), _truncate(model, _clean(item.text))] for item in inputs]


def tokenizer_inputs(model, inputs: Sequence[EncoderInput]) -> list[str]:
    """The strings ``LLM2Vec.encode`` tokenizes for these inputs; training feeds the same strings."""
    return [
        model.prepare_for_tokenization(model._convert_to_str(instruction, text))
        for instruction, text in instruction_text_pairs(model, inputs)
    ]


def _truncate(model, text: str) -> str:
    """Cut a text to llm2vec's ``doc_max_length`` tokens by token offsets (llm2vec itself cuts by
    whitespace-separated words, which empties a long text without spaces)."""
    limit = model.doc_max_length
    offsets = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if len(offsets) <= limit else text[: offsets[limit - 1][1]]


def _clean(text: str) -> str:
    """Remove llm2vec's internal separator, which would split the text in the wrong place."""
    return text.replace(LLM2VEC_SEPARATOR, " ")
