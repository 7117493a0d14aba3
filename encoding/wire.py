"""The inline encode wire format: what the API sends a worker's inline server and what comes back.

    request  {"encoder": NAME, "key": KEY | null, "inputs": [{"instruction": str | null, "text": str}, ...]}
    answer   {"encoder": NAME, "key": KEY, "dim": D, "vectors": base64 of float32 (little-endian, row-major)}

At most ``MAX_INPUTS`` inputs and ``MAX_BODY_BYTES`` bytes per request. The client
(``service/inline_encoder.py``) writes requests and reads answers; the server (``llmatch worker
--serve-inline``) reads requests and writes answers, both with these functions.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from encoding.encoder import EncoderInput

MAX_INPUTS = 64  # texts per request: inline encodes are a few records, not batches (those go through the queue)
MAX_BODY_BYTES = 8 * 1024 * 1024


def input_json(item: EncoderInput) -> str:
    """One input as the JSON text a request lists."""
    return json.dumps({"instruction": item.instruction, "text": item.text})


def request_envelope(encoder: str, key: str | None) -> str:
    """A request's text up to its list of inputs; ``request_body`` closes it."""
    return f'{{"encoder":{json.dumps(encoder)},"key":{json.dumps(key)},"inputs":['


def request_body(envelope: str, inputs: Sequence[str]) -> str:
    """A whole request: ``envelope`` and these inputs (``input_json`` texts)."""
    return envelope + ",".join(inputs) + "]}"


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


def vectors_answer(encoder: str, key: str, vectors: np.ndarray) -> dict[str, Any]:
    """The 200 answer carrying ``vectors`` (one row per input, in order)."""
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    return {
        "encoder": encoder,
        "key": key,
        "dim": int(vectors.shape[1]),
        "vectors": base64.b64encode(vectors.tobytes()).decode("ascii"),
    }


def decode_vectors(payload: dict[str, Any], count: int) -> np.ndarray:
    """The float32 matrix of a 200 answer, checked against the number of inputs sent."""
    raw = base64.b64decode(payload["vectors"])
    dim = int(payload["dim"])
    vectors = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if dim <= 0 or vectors.size != count * dim:
        raise ValueError(f"expected {count} vectors of dimension {dim}, got {vectors.size} numbers")
    return vectors.reshape(count, dim)
