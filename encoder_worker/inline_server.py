"""Inline encodes served by the worker: a small HTTP endpoint over the worker's already-loaded encoders.

In a deployment where only the worker has the accelerator, the API sends the records of ``POST /match`` and
``POST /candidates`` here (``LLMATCH_INLINE_ENCODER_URL``) instead of running the encoder on its CPU. Bodies
follow ``encoding/wire.py``:

    POST /encode   {"encoder": NAME, "key": KEY | null, "inputs": [{"instruction": str | null, "text": str}, ...]}
        200 {"encoder": NAME, "key": KEY, "dim": D, "vectors": base64 of float32 (little-endian, row-major)}
        400 malformed request, 404 unknown encoder, 409 the caller's ``key`` names other weights than this
        worker's encoder of that name, 413 too many texts, 503 busy or encoder unavailable
    GET /healthz   200 {"status": "ok"}

At most ``concurrency`` requests are encoded or wait for the encoder at once; one more waits up to
``wait_seconds`` for a slot, then gets 503. Errors are ``{"detail": "..."}``. Standard library only.

The endpoint has no authentication: it listens on loopback unless told otherwise. A connection that sends or
reads nothing for ``timeout`` seconds is closed, and at most ``max_connections`` are handled at once (one thread
each); a further connection waits up to ``timeout`` for one of them to end, then gets 503.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from encoding.registry import EncoderPool, EncoderUnavailableError, UnknownEncoderError
from encoding.wire import MAX_BODY_BYTES, MAX_INPUTS, parse_request, vectors_answer
from llmatch.settings import Settings

log = logging.getLogger("llmatch.inline")

DEFAULT_TIMEOUT_SECONDS: float = Settings.model_fields["inline_server_timeout_seconds"].default
DEFAULT_MAX_CONNECTIONS: int = Settings.model_fields["inline_server_max_connections"].default


class InlineEncodeServer:
    """``POST /encode`` over ``pool`` in a background thread; ``start()``, then ``stop()``."""

    def __init__(
        self,
        pool: EncoderPool,
        host: str = "127.0.0.1",
        port: int = 0,
        concurrency: int = 4,
        wait_seconds: float = 10.0,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.pool = pool
        self.wait_seconds = wait_seconds
        self.slots = threading.BoundedSemaphore(concurrency)
        self.httpd = _BoundedServer((host, port), self, timeout, max_connections)
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
        self.httpd.stopping.set()
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
        return 200, vectors_answer(name, spec.key, vectors)


class _BoundedServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` at once; each connection's socket times out."""

    daemon_threads = True
    request_queue_size = 64  # connections the kernel holds while every handler thread is taken

    def __init__(
        self, address: tuple[str, int], inline: InlineEncodeServer, timeout: float, max_connections: int
    ) -> None:
        self.inline = inline
        self.connection_timeout = timeout
        self.max_connections = max_connections
        self.connections = threading.BoundedSemaphore(max_connections)
        self.stopping = threading.Event()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to a thread once one of the ``max_connections`` is free; 503 after ``timeout``."""
        if not self._take_connection_slot():
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def _take_connection_slot(self) -> bool:
        deadline = time.monotonic() + self.connection_timeout
        while not self.stopping.is_set():
            if self.connections.acquire(timeout=max(0.0, min(0.1, deadline - time.monotonic()))):
                return True
            if time.monotonic() >= deadline:
                break
        return False

    def _refuse(self, request: socket.socket) -> None:
        log.warning("inline encodes: all %d connections stayed busy; one refused", self.max_connections)
        body = json.dumps({"detail": "All inline encode connections stayed busy; retry shortly."}).encode()
        head = "HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        try:
            request.settimeout(1.0)
            request.sendall(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    server_version = "llmatch-inline/1"

    def setup(self) -> None:
        self.timeout = self.server.connection_timeout  # type: ignore[attr-defined]  # each socket operation
        super().setup()

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
        body = self.rfile.read(int(length))  # a stalled sender times out here (handle_one_request closes it)
        try:
            status, payload = self.server.inline.answer(body)  # type: ignore[attr-defined]
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
