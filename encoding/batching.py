"""Batches cut by token count: texts sorted by token length, each batch's padded size within a budget."""

from __future__ import annotations

from collections.abc import Sequence

# Padded tokens per forward pass (rows x longest row) by device: a GPU wants large batches, a CPU gains
# little beyond a few thousand tokens and pays in memory.
DEFAULT_BATCH_TOKENS = {"cpu": 8_192, "cuda": 65_536}


def default_batch_tokens(device: str) -> int:
    return DEFAULT_BATCH_TOKENS["cuda" if device.startswith("cuda") else "cpu"]


def token_batches(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices of ``lengths`` sorted longest first and cut into batches whose padded size (rows x the
    batch's longest row) stays within ``max_tokens`` and whose rows stay within ``max_rows``; a row longer
    than the budget is a batch of its own."""
    if max_tokens < 1 or max_rows < 1:
        raise ValueError("max_tokens and max_rows must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        width = max(1, lengths[order[start]])
        rows = max(1, min(max_rows, max_tokens // width))
        batches.append(order[start : start + rows])
        start += rows
    return batches
