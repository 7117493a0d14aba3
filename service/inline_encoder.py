"""Inline encodes sent to a worker's accelerator (``LLMATCH_INLINE_ENCODER_URL``) instead of this process.

In the compose deployment the API has no GPU: with the setting, every on-the-spot encode (inline records of
``POST /match`` and ``POST /candidates``, explanations) goes to ``llmatch worker --serve-inline PORT``, which
encodes with the models it already holds (both sides speak ``encoding/wire.py``). Specs (names, keys of the
content cache) stay this process's configuration; the worker refuses a name whose key differs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from encoding.encoder import EncoderInput
from encoding.registry import EncoderPool
from encoding.wire import MAX_BODY_BYTES, MAX_INPUTS, decode_vectors, input_json, request_body, request_envelope
from llmatch.settings import Settings
from service.errors import ServiceUnavailable

log = logging.getLogger(__name__)


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
        """Vectors of ``inputs`` from the worker, each text cut to ``max_text_chars`` as the local pool does and
        sent in requests the worker accepts; 503 with what to fix when it cannot give them."""
        limit = self.inner.max_text_chars
        items = [input_json(EncoderInput(item.instruction, item.text[:limit])) for item in inputs]
        envelope = request_envelope(name, self.inner.spec(name).key)
        chunks = request_chunks(items, len(envelope) + 2) or [[]]
        return np.concatenate([self._post(request_body(envelope, chunk), len(chunk)) for chunk in chunks])

    def _post(self, body: str, count: int) -> np.ndarray:
        """Vectors of one request's ``count`` inputs."""
        try:
            response = self._client.post(
                self.url, content=body.encode("ascii"), headers={"Content-Type": "application/json"}
            )
        except httpx.TimeoutException:
            raise self._unavailable(
                f"did not answer within {self.timeout:g} s (LLMATCH_INLINE_ENCODER_TIMEOUT_SECONDS); retry, or check "
                "the worker serving inline encodes"
            ) from None
        except httpx.HTTPError as error:
            raise self._unavailable(
                f"is unreachable ({error.__class__.__name__}); start the worker with --serve-inline PORT or correct "
                "LLMATCH_INLINE_ENCODER_URL"
            ) from None
        if response.status_code != 200:
            raise self._unavailable(f"refused the request ({response.status_code}: {_detail(response)})")
        try:
            return decode_vectors(response.json(), count)
        except (ValueError, KeyError, TypeError) as error:
            raise self._unavailable(f"sent an unreadable answer ({error})") from None

    def _unavailable(self, problem: str) -> ServiceUnavailable:
        """A 503 saying ``problem``; the worker's address goes to the log only, never to the client."""
        log.warning("inline encoder at %s %s", self.url, problem)
        return ServiceUnavailable(f"The inline encoder {problem}.")

    def close(self) -> None:
        self._client.close()


def request_chunks(items: list[str], envelope_bytes: int) -> list[list[str]]:
    """``items`` (JSON texts) in order, grouped so that no request has more than ``MAX_INPUTS`` of them or more
    than ``MAX_BODY_BYTES`` in all (``envelope_bytes`` of it around the items)."""
    chunks: list[list[str]] = []
    size = 0
    for item in items:
        if envelope_bytes + len(item) > MAX_BODY_BYTES:
            raise ServiceUnavailable(
                "One text is too long for the inline encoder's request limit; an operator must lower "
                "LLMATCH_MAX_TEXT_CHARS."
            )
        if not chunks or len(chunks[-1]) == MAX_INPUTS or size + 1 + len(item) > MAX_BODY_BYTES:
            chunks.append([])
            size = envelope_bytes
        chunks[-1].append(item)
        size += len(item) + 1
    return chunks


def _detail(response: httpx.Response) -> str:
    """The worker's own ``detail``; any other body is logged, not passed on (it may come from something else)."""
    try:
        return str(response.json()["detail"]).rstrip(".")
    except (ValueError, KeyError, TypeError):
        log.warning("inline encoder answered %d without a JSON detail: %r", response.status_code, response.text[:200])
        return "no readable detail"


def inline_encoder_pool(pool: EncoderPool, settings: Settings) -> EncoderPool | RemoteEncodes:
    """What the API encodes inline records with: the worker at ``LLMATCH_INLINE_ENCODER_URL``, else ``pool``."""
    if not settings.inline_encoder_url:
        return pool
    return RemoteEncodes(pool, settings.inline_encoder_url, settings.inline_encoder_timeout_seconds)
