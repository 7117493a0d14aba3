"""Errors answered as ``{"detail": "<one sentence a person can act on>"}`` with a 4xx status."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from learning.errors import LearningError, TooFewLabels

log = logging.getLogger("llmatch.api")


class ApiError(Exception):
    """An out-of-contract request; ``extra`` fields are added to the JSON body."""

    status_code = 400

    def __init__(self, detail: str, **extra: Any):
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class NotFound(ApiError):
    status_code = 404


class Conflict(ApiError):
    status_code = 409


class Unprocessable(ApiError):
    status_code = 422


class ServiceUnavailable(ApiError):
    """A configured dependency (e.g. an encoder's model folder) is missing: an operator must act."""

    status_code = 503


# An absolute file path on the server (not a URL: nothing word-like, ':' or '/' right before it).
SERVER_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\":,;()]+/)+[^\s/'\":,;()]*")


def without_paths(text: str) -> str:
    """Text stored from a server-side error (e.g. a failed record's), with file paths replaced by ``<path>``."""
    return SERVER_PATH.sub("<path>", text)


def printable(text: str) -> str:
    """Text that can be sent as UTF-8 JSON even when it echoes a client's lone surrogates (shown escaped)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    text = ""
    for part in parts:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text


def _sentence(errors: list[dict[str, Any]]) -> tuple[int, str]:
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "malformed JSON")
        return 400, f"The request body is not valid JSON ({reason}); send a JSON object."
    loc = tuple(first.get("loc", ()))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if "[key]" in loc:  # pydantic's marker for a bad dictionary key: here, an attribute name
        loc = loc[: loc.index("[key]") - 1]
        message = f"attribute names must have 1 to 256 characters ({message[:1].lower()}{message[1:]})"
    where = _location(loc)
    if not where and first.get("type") == "missing":
        return 422, "The request body is missing; send a JSON object as the contract describes."
    if not where and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return 422, "The request body must be a JSON object (with Content-Type: application/json)."
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return 422, f"Invalid request: {where + ': ' if where else ''}{message}{more}."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"detail": error.detail, **error.extra}, status_code=error.status_code)

    @app.exception_handler(LearningError)
    async def _learning_error(_request: Request, error: LearningError) -> JSONResponse:
        """What a training job cannot do with the dataset as it stands (too few labels, a job unfinished): 409."""
        extra: dict[str, Any] = {}
        if isinstance(error, TooFewLabels):
            extra = {
                "matches": error.matches,
                "non_matches": error.non_matches,
                "needed_matches": error.need_matches,
                "needed_non_matches": error.need_non_matches,
            }
        return JSONResponse({"detail": str(error), **extra}, status_code=409)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        errors = list(error.errors())
        status, detail = _sentence(errors)
        problems = [
            {"loc": printable(_location(tuple(e.get("loc", ())))), "msg": printable(str(e.get("msg")))}
            for e in errors[:20]
        ]
        return JSONResponse({"detail": printable(detail), "errors": problems}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = error.detail if isinstance(error.detail, str) else "request refused"
        if error.status_code == 404 and detail == "Not Found":
            detail = "No such route; see /docs for the API."
        if error.status_code == 405:
            detail = "This route does not accept that HTTP method; see /docs for the API."
        return JSONResponse({"detail": detail}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "Internal error; the server log has the details."}, status_code=500)
