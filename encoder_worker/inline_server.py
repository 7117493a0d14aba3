"""Inline encodes served by the worker: a small HTTP endpoint over the worker's already-loaded encoders.

In a deployment where only the worker has the accelerator, the API sends the records of ``POST /match`` and
``POST /candidates`` here (``LLMATCH_INLINE_ENCODER_URL``) instead of running the encoder on its CPU.

    POST /encode   {"encoder": NAME, "key": KEY | null, "inputs": [{"instruction": str | null, "text": str}, ...]}
        200 {"encoder": NAME, "key": KEY, "dim": D, "vectors": base64 of float32 (little-endian, row-major)}
        400 malformed request, 404 unknown encoder, 409 the caller's ``key`` names other weights than this
        worker's encoder of that name, 413 too many texts, 503 busy or encoder unavailable
    GET /healthz   200 {"status": "ok"}

At most ``concurrency`` requests are encoded or wait for the encoder at once; one more waits up to
``wait_seconds`` for a slot, then gets 503. Errors are ``{"detail": "..."}``. Standard library only.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from encoder_worker.encoders.base import EncoderInput
from encoder_worker.encoders.registry import EncoderPool, EncoderUnavailableError, UnknownEncoderError

log = logging.getLogger("llmatch.inline")

MAX_INPUTS = 64  # texts per request: inline encodes are a few records, not batches (those go through the queue)
MAX_BODY_BYTES = 8 * 1024 * 1024


class InlineEncodeServer:
    """``POST /encode`` over ``pool`` in a background thread; ``start()``, then ``stop()``."""

    def __init__(
        self, pool: EncoderPool, host: str, port: int, concurrency: int = 4, wait_seconds: float = 10.0
    ) -> None:
        self.pool = pool
        self.wait_seconds = wait_seconds
        self.slots = threading.BoundedSemaphore(concurrency)
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.inline = self  # type: ignore[attr-defined]  # the handler reaches the server through it
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self, preload: str | None = None) -> None:
        """Serve in a daemon thread; ``preload`` names an encoder to load now rather than at the first request."""
        if preload:
            threading.Thread(target=self._preload, args=(preload,), name="inline-preload", daemon=True).start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="inline-encodes", daemon=True)
        self._thread.start()
        log.info("serving inline encodes on %s:%d", *self.httpd.server_address[:2])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _preload(self, name: str) -> None:
        try:
            self.pool.get(name)
        except Exception:  # noqa: BLE001 - a request for it will report the problem
            log.exception("could not load encoder %s for inline encodes", name)

    def answer(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) for one ``POST /encode``."""
        try:
            name, key, inputs = parse_request(body)
        except ValueError as error:
            return 400, {"detail": str(error)}
        if not inputs:
            return 400, {"detail": "Send at least one input."}
        if len(inputs) > MAX_INPUTS:
            return 413, {"detail": f"At most {MAX_INPUTS} texts per inline encode; send more through POST /records."}
        try:
            spec = self.pool.spec(name)
        except UnknownEncoderError as error:
            return 404, {"detail": f"{error}."}
        if key is not None and key != spec.key:
            return 409, {
                "detail": f"This worker's encoder {name!r} has other weights or settings (key {spec.key}) than the "
                f"caller's (key {key}); give both the same encoder configuration."
            }
        if not self.slots.acquire(timeout=self.wait_seconds):
            return 503, {"detail": f"All inline encode slots stayed busy for {self.wait_seconds:g} s; retry shortly."}
        try:
            vectors = self.pool.encode(name, inputs)
        except EncoderUnavailableError as error:
            log.warning("inline encode refused: %s", error)
            return 503, {"detail": f"Encoder {name!r} cannot be loaded on this worker; an operator must install it."}
        finally:
            self.slots.release()
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        return 200, {
            "encoder": name,
            "key": spec.key,
            "dim": int(vectors.shape[1]),
            "vectors": base64.b64encode(vectors.tobytes()).decode("ascii"),
        }


def parse_request(body: bytes) -> tuple[str, str | None, list[EncoderInput]]:
    """(encoder name, expected key, inputs) of a request body; ValueError says what is wrong."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"The body is not valid JSON ({error}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("encoder"), str):
        raise ValueError('Send {"encoder": NAME, "key": KEY, "inputs": [{"instruction", "text"}, ...]}.')
    key = data.get("key")
    items = data.get("inputs")
    if (key is not None and not isinstance(key, str)) or not isinstance(items, list):
        raise ValueError('"key" must be a string or null and "inputs" a list.')
    inputs = []
    for item in items:
        text, instruction = (item.get("text"), item.get("instruction")) if isinstance(item, dict) else (None, None)
        if not isinstance(text, str) or not (instruction is None or isinstance(instruction, str)):
            raise ValueError('Each input must be {"instruction": string or null, "text": string}.')
        inputs.append(EncoderInput(instruction, text))
    return data["encoder"], key, inputs


def decode_vectors(payload: dict[str, Any], count: int) -> np.ndarray:
    """The float32 matrix of a 200 answer, checked against the number of inputs sent."""
    raw = base64.b64decode(payload["vectors"])
    dim = int(payload["dim"])
    vectors = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if dim <= 0 or vectors.size != count * dim:
        raise ValueError(f"expected {count} vectors of dimension {dim}, got {vectors.size} numbers")
    return vectors.reshape(count, dim)


class _Handler(BaseHTTPRequestHandler):
    server_version = "llmatch-inline/1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/healthz":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"detail": "No such route; use POST /encode or GET /healthz."})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/encode":
            self._send(404, {"detail": "No such route; use POST /encode or GET /healthz."})
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            self._send(413, {"detail": f"Send a Content-Length of at most {MAX_BODY_BYTES} bytes."})
            return
        try:
            status, payload = self.server.inline.answer(self.rfile.read(int(length)))  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - the server thread survives; the caller gets a clear answer
            log.exception("inline encode failed")
            status, payload = 500, {"detail": "The worker failed to encode these texts; its log has the details."}
        self._send(status, payload)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s %s", self.address_string(), format % args)
