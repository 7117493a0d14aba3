"""The published OpenAPI, made to say what the service sends, for every route (present and future) at once.

FastAPI documents what a route's signature shows. This module adds, by post-processing ``app.openapi()``:
the contract's error body (``{"detail": str, ...}``) for every 4xx a route can answer (422 replacing FastAPI's
array-of-errors; 400 and 413 with a body; 404 where a dataset, record or path names something stored; 401 and
403 where a route requires a key; and the statuses of ``EXTRA_STATUSES``), the known encoder names, and no
leftover FastAPI validation schemas. ``AllowHeader`` makes every 405 list all the methods of its path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel, ConfigDict
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmatch.settings import Settings

ERROR = "Error"
REF = f"#/components/schemas/{ERROR}"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")

# Statuses routes answer beyond those their signature implies, by method and path prefix (as in the OpenAPI).
# 409: what is stored is not ready for the request (a record not encoded yet, a dataset not calibrated);
# 429 and 503: the route encodes on the spot (inline records, explanations), in a bounded number of slots.
EXTRA_STATUSES: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("get", "/match", (409, 429, 503)),
    ("post", "/match", (409, 429, 503)),
    ("get", "/candidates", (409,)),
    ("post", "/candidates", (409, 429, 503)),
    ("*", "/datasets/{name}/", (409,)),  # calibration, labels, review, entities, requeue
)
# The service refuses NUL in every text it stores (PostgreSQL cannot hold it); free-text inputs say so.
NO_NUL = "^[^\\u0000]*$"

DESCRIPTIONS = {
    400: "The body is not valid JSON.",
    401: "No key, or an unknown, revoked or expired one.",
    403: "The key lacks the scope this route needs; `detail` names it.",
    404: "Unknown dataset, record or resource; `detail` says how to create it.",
    409: "The request conflicts with what is stored (e.g. a record not encoded yet).",
    413: "The request body is too large.",
    422: "The request breaks the contract; `detail` says what to fix, `errors` lists each problem.",
    429: "Too many requests.",
    503: "A dependency (an encoder's model, the database) is unavailable; an operator must act.",
}


class ValidationProblem(BaseModel):
    loc: str
    msg: str


class ErrorOut(BaseModel):
    """Every refused request: one sentence a person can act on; some errors add fields (e.g. ``errors``)."""

    model_config = ConfigDict(extra="allow", title=ERROR)

    detail: str
    errors: list[ValidationProblem] | None = None


def install(app: FastAPI, settings: Settings) -> None:
    """Publish the post-processed OpenAPI at ``/openapi.json`` and list every allowed method on 405 answers."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe(generate(), available_encoders(settings))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(AllowHeader, router=app.router)


def available_encoders(settings: Settings) -> list[str]:
    """Encoder names a dataset may use: configured, with their model folders present."""
    from encoding.registry import configured_specs

    return sorted(name for name, spec in configured_specs(settings).items() if spec.available)


def describe(schema: dict[str, Any], encoders: list[str] | None = None) -> dict[str, Any]:
    """``schema`` (FastAPI's) with the contract's errors on every operation and the encoder names known."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    error = ErrorOut.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error.pop("$defs", {}))
    components[ERROR] = error
    secured_everywhere = bool(schema.get("security"))
    for path, method, operation in _operations(schema):
        statuses = _implied_statuses(path, operation, components, secured_everywhere)
        statuses |= {s for m, prefix, extra in EXTRA_STATUSES if m in ("*", method) and path.startswith(prefix)
                     for s in extra}  # fmt: skip
        statuses |= {int(code) for code in operation.get("responses", {}) if code.isdigit() and int(code) >= 400}
        responses = operation.setdefault("responses", {})
        for status in sorted(statuses):
            _document_error(responses, status)
    inputs = _request_components(schema)
    for name in inputs:
        if encoders:
            _restrict_encoder(components.get(name, {}), encoders)
        _forbid_nul(components.get(name, {}))
    for _, _, operation in _operations(schema):
        for parameter in operation.get("parameters", []):
            _forbid_nul(parameter.get("schema", {}))
        for content in operation.get("requestBody", {}).get("content", {}).values():
            _forbid_nul(content.get("schema", {}))
    return schema


def _forbid_nul(node: Any) -> None:
    """Free-text strings (no pattern, enum, const or format) of a request schema refuse NUL; $refs are left
    to their components."""
    if isinstance(node, list):
        for item in node:
            _forbid_nul(item)
        return
    if not isinstance(node, dict) or "$ref" in node:
        return
    if node.get("type") == "string" and not {"pattern", "enum", "const", "format"} & set(node):
        node["pattern"] = NO_NUL
    for key, value in node.items():
        if key not in ("default", "examples", "example", "const", "enum"):
            _forbid_nul(value)


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def _implied_statuses(
    path: str, operation: dict[str, Any], components: dict[str, Any], secured_everywhere: bool
) -> set[int]:
    parameters = operation.get("parameters", [])
    body = operation.get("requestBody")
    statuses: set[int] = set()
    if parameters or body:
        statuses.add(422)
    if body:
        statuses |= {400, 413}
    body_fields = _body_properties(body, components) if body else set()
    names = {p.get("name") for p in parameters}
    if any(p.get("in") == "path" for p in parameters) or "dataset" in names or "dataset" in body_fields:
        statuses.add(404)
    if operation.get("security") or (secured_everywhere and operation.get("security") != []):
        statuses |= {401, 403}
    return statuses


def _body_properties(body: dict[str, Any], components: dict[str, Any]) -> set[str]:
    schema = body.get("content", {}).get("application/json", {}).get("schema", {})
    for option in [schema, *schema.get("anyOf", [])]:
        ref = option.get("$ref", "")
        if ref:
            return set(components.get(ref.rsplit("/", 1)[-1], {}).get("properties", {}))
    return set(schema.get("properties", {}))


def _document_error(responses: dict[str, Any], status: int) -> None:
    response = responses.setdefault(str(status), {})
    response.setdefault("description", DESCRIPTIONS.get(status, "Refused; `detail` says why."))
    content = response.setdefault("content", {})
    json_content = content.setdefault("application/json", {})
    if status == 422 or "schema" not in json_content:  # 422: FastAPI's array-of-errors model, replaced
        json_content["schema"] = {"$ref": REF}


def _request_components(schema: dict[str, Any]) -> set[str]:
    """Names of the component schemas that request bodies use, directly or nested."""
    components = schema.get("components", {}).get("schemas", {})
    seen: set[str] = set()
    todo = [op["requestBody"] for _, _, op in _operations(schema) if "requestBody" in op]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[-1]
                if name not in seen:
                    seen.add(name)
                    todo.append(components.get(name, {}))
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return seen


def _restrict_encoder(component: dict[str, Any], encoders: list[str]) -> None:
    """An ``encoder`` property of a request body accepts the configured encoder names (and null if it did)."""
    prop = component.get("properties", {}).get("encoder")
    if prop is None:
        return
    nullable = any(option.get("type") == "null" for option in prop.get("anyOf", []))
    described = {k: v for k, v in prop.items() if k in ("title", "description", "default")}
    names = {"type": "string", "enum": sorted(encoders)}
    component["properties"]["encoder"] = {**described, **({"anyOf": [names, {"type": "null"}]} if nullable else names)}


def allowed_methods(router: Any, scope: Scope) -> list[str]:
    """Every method some route of ``router`` accepts on the scope's path."""
    methods: set[str] = set()
    for route in iter_route_contexts(router.routes):  # included routers' routes, with their prefixes
        route_methods = route.methods
        if route_methods and route.matches(dict(scope))[0] != Match.NONE:
            methods |= set(route_methods)
    return sorted(methods)


class AllowHeader:
    """405 answers name every method of the path in ``Allow`` (Starlette names only the first matching route's,
    while GET, PUT and DELETE of one path are separate routes)."""

    def __init__(self, app: ASGIApp, router: Any):
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                methods = allowed_methods(self.router, {**scope, "method": "\0"})
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {**message, "headers": [*headers, (b"allow", ", ".join(methods).encode())]}
            await send(message)

        await self.app(scope, receive, send_with_allow)
