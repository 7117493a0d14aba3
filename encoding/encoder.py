"""The one interface every encoder implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class EncoderInput:
    """What is embedded: an optional instruction and the rendered record text."""

    instruction: str | None
    text: str


class Encoder(Protocol):
    """Turns inputs into L2-normalised float32 vectors of shape ``(len(inputs), dim)``."""

    key: str  # stable identity of the weights and settings; names the content cache
    dim: int

    def encode(self, inputs: Sequence[EncoderInput], batch_size: int = 32) -> np.ndarray: ...


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation into a contiguous float32 array; zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)
