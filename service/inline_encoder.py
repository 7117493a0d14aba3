"""Inline encodes sent to a worker's accelerator (``LLMATCH_INLINE_ENCODER_URL``) instead of this process.

In the compose deployment the API has no GPU: with the setting, every on-the-spot encode (inline records of
``POST /match`` and ``POST /candidates``, explanations) goes to ``llmatch worker --serve-inline PORT``
(``encoder_worker/inline_server.py``), which encodes with the models it already holds. Specs (names, keys of
the content cache) stay this process's configuration; the worker refuses a name whose key differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from encoder_worker.encoders.base import EncoderInput
from encoder_worker.encoders.registry import EncoderPool
from encoder_worker.inline_server import decode_vectors
from llmatch.settings import Settings
from service.errors import ServiceUnavailable


class RemoteEncodes:
    """The encoder pool with ``encode`` answered by the worker at ``url``; everything else is the wrapped pool's."""

    def __init__(self, pool: EncoderPool, url: str, timeout: float):
        self.inner = pool
        self.url = url.rstrip("/") + "/encode"
        self.timeout = timeout
        self._client = httpx.Client(timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, name: str, inputs: Sequence[EncoderInput]) -> np.ndarray:
        """Vectors of ``inputs`` from the worker; 503 with what to fix when it cannot give them."""
        body = {
            "encoder": name,
            "key": self.inner.spec(name).key,
            "inputs": [{"instruction": item.instruction, "text": item.text} for item in inputs],
        }
        try:
            response = self._client.post(self.url, json=body)
        except httpx.TimeoutException:
            raise ServiceUnavailable(
                f"The inline encoder at {self.url} did not answer within {self.timeout:g} s "
                "(LLMATCH_INLINE_ENCODER_TIMEOUT_SECONDS); retry, or check the worker serving inline encodes."
            ) from None
        except httpx.HTTPError as error:
            raise ServiceUnavailable(
                f"The inline encoder at {self.url} is unreachable ({error.__class__.__name__}); start the worker "
                "with --serve-inline PORT or correct LLMATCH_INLINE_ENCODER_URL."
            ) from None
        if response.status_code != 200:
            raise ServiceUnavailable(
                f"The inline encoder at {self.url} refused the request ({response.status_code}: {_detail(response)})."
            )
        try:
            return decode_vectors(response.json(), len(inputs))
        except (ValueError, KeyError, TypeError) as error:
            raise ServiceUnavailable(f"The inline encoder at {self.url} sent an unreadable answer ({error}).") from None

    def close(self) -> None:
        self._client.close()


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json()["detail"]).rstrip(".")
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or "no detail"


def inline_encoder_pool(pool: EncoderPool, settings: Settings) -> EncoderPool | RemoteEncodes:
    """What the API encodes inline records with: the worker at ``LLMATCH_INLINE_ENCODER_URL``, else ``pool``."""
    if not settings.inline_encoder_url:
        return pool
    return RemoteEncodes(pool, settings.inline_encoder_url, settings.inline_encoder_timeout_seconds)
