"""Schemathesis hooks for fuzzing llmatch (``SCHEMATHESIS_HOOKS=bench.reliability.schemathesis_hooks``).

Failures dropped, each for a stated reason:

- What JSON Schema cannot state: the ids of one ``POST /records`` batch are distinct (ids compared as the
  service keeps them: ``1``, ``1.0`` and ``"1"`` are one id). A generated batch that repeats one is refused
  with 422 as the contract says; that refusal is not a failure."""

from __future__ import annotations

from typing import Any

import schemathesis


def _id_text(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def repeats_an_id(body: Any) -> bool:
    if not isinstance(body, dict) or not isinstance(body.get("records"), list):
        return False
    ids = [
        _id_text(r["id"]) for r in body["records"] if isinstance(r, dict) and isinstance(r.get("id"), str | int | float)
    ]
    return len(set(ids)) != len(ids)


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    path, status, text = case.operation.path, response.status_code, response.text
    duplicate_ids = path == "/records" and status == 422 and "more than once" in text and repeats_an_id(case.body)
    return not duplicate_ids
