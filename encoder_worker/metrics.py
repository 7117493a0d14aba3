"""Prometheus metrics of the encoder worker."""

import threading
from typing import Any

from prometheus_client import Counter, Histogram, start_http_server

RECORDS_ENCODED = Counter("llmatch_records_encoded_total", "Records marked encoded.", ["encoder"])
RECORDS_FAILED = Counter("llmatch_records_failed_total", "Records given back after an encoding failure.", ["encoder"])
ENCODER_INPUTS = Counter("llmatch_encoder_inputs_total", "Texts sent through an encoder.", ["encoder"])
CACHE_HITS = Counter("llmatch_embedding_cache_hits_total", "Records whose text was already encoded.", ["encoder"])
BATCH_SECONDS = Histogram(
    "llmatch_encode_batch_seconds",
    "Encoder time per batch.",
    ["encoder"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


def serve_metrics(port: int, host: str = "127.0.0.1") -> tuple[Any, threading.Thread]:
    """Serve ``/metrics`` on ``host:port`` (loopback unless told otherwise: it has no authentication)."""
    return start_http_server(port, addr=host)
