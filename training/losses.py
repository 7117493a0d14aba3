"""Contrastive losses over cosine similarity."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCALE = 20.0  # 1 / temperature 0.05, as in LLM2Vec and sentence-transformers' MultipleNegativesRankingLoss


def cosine_matrix(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return F.normalize(left, dim=-1) @ F.normalize(right, dim=-1).T


def info_nce(
    queries: torch.Tensor, documents: torch.Tensor, ignore: torch.Tensor | None = None, scale: float = SCALE
) -> torch.Tensor:
    """Cross-entropy of each query against all documents, where ``documents[i]`` is query i's positive.

    Documents after the first ``len(queries)`` are extra (hard) negatives shared by the batch. ``ignore`` marks
    (query, document) cells left out of the softmax, e.g. another query's positive that also matches this one.
    """
    scores = cosine_matrix(queries, documents) * scale
    if ignore is not None:
        scores = scores.masked_fill(ignore, float("-inf"))
    targets = torch.arange(len(queries), device=scores.device)
    return F.cross_entropy(scores, targets)


def cosent(scores: torch.Tensor, labels: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    """CoSENT over labelled pair scores: log(1 + sum of exp(scale * (s_non_match - s_match))) over all
    (non-match, match) combinations.

    Near zero only when every match scores above every non-match, across records: the order one global
    threshold needs, which InfoNCE (a ranking within each query's row) does not ask for.
    """
    differences = scores[labels == 0][:, None] - scores[labels == 1][None, :]
    logits = torch.cat([torch.zeros(1, device=scores.device, dtype=scores.dtype), (differences * scale).flatten()])
    return torch.logsumexp(logits, dim=0)
