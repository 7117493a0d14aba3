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


def _torch_dtype(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


class LLM2VecEncoder:
    """``LLM2Vec.from_pretrained`` on a local folder (or hub id), with an optional PEFT adapter."""

    def __init__(
        self,
        key: str,
        model_path: str | Path,
        adapter_path: str | Path | None = None,
        device: str = "cpu",
        pooling_mode: str = "mean",
        max_length: int = 512,
    ):
        from llm2vec import LLM2Vec

        self.key = key
        self.device = device
        try:
            self.model = LLM2Vec.from_pretrained(
                str(model_path),
                peft_model_name_or_path=str(adapter_path) if adapter_path else None,
                merge_peft=bool(adapter_path),
                enable_bidirectional=True,
                pooling_mode=pooling_mode,
                max_length=max_length,
                torch_dtype=_torch_dtype(device),
            )
        except ValueError as error:
            if "not supported yet with bidirectional" in str(error):
                raise UnsupportedModelError(
                    f"{model_path}: llm2vec can make only Llama, Mistral, Gemma and Qwen2 models "
                    f"bidirectional ({error})"
                ) from error
            raise
        self.model.to(device)
        self.model.eval()
        self.dim = int(self.model.model.config.hidden_size)

    def encode(self, inputs: Sequence[EncoderInput], batch_size: int = 8) -> np.ndarray:
        """Embed ``[instruction, text]`` pairs; a text without tokens is the zero vector (similar to nothing)."""
        vectors = np.zeros((len(inputs), self.dim), dtype=np.float32)
        pairs = [[_clean(item.instruction or ""), self._truncate(_clean(item.text))] for item in inputs]
        # llm2vec pools a text without tokens over the whole row (or fails on an all-empty batch): skip them.
        keep = [i for i, (_, text) in enumerate(pairs) if text.strip()]
        if keep:
            vectors[keep] = self.model.encode(
                [pairs[i] for i in keep], batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True,
                device=self.device,
            )
        return l2_normalise(np.nan_to_num(vectors, nan=0.0))

    def _truncate(self, text: str) -> str:
        """Cut a text to llm2vec's ``doc_max_length`` tokens by token offsets (llm2vec itself cuts by
        whitespace-separated words, which empties a long text without spaces)."""
        limit = self.model.doc_max_length
        encoded = self.model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        return text if len(offsets) <= limit else text[: offsets[limit - 1][1]]


def _clean(text: str) -> str:
    """Remove llm2vec's internal separator, which would split the text in the wrong place."""
    return text.replace(LLM2VEC_SEPARATOR, " ")
