"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}} with the right status.

Every failure a client can cause is an `OpenAIError` (4xx) raised where it is detected; FastAPI's own
errors (malformed JSON, body validation, unknown route, wrong method) are converted to the same shape.
"""
from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def _loc(loc: tuple) -> str | None:
    """Dotted field path; drops "body" and the member tags pydantic adds inside unions (e.g. "list[int]")."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-int", "constrained-float", "constrained-str"}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable line naming the field, the value and what is wrong (first 3 distinct fields)."""
    msgs, seen = [], set()
    for err in errors:
        where = _loc(tuple(err.get("loc", ())))
        if where in seen:
            continue
        seen.add(where)
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if where is None:
            msgs.append(msg)
            continue
        got = err.get("input")
        shown = "" if err.get("type") == "missing" else f" (got {json.dumps(got, default=str)[:80]})"
        msgs.append(f"{where}: {msg}{shown}")
    more = f" (and {len(seen) - 3} more fields)" if len(seen) > 3 else ""
    return "; ".join(msgs[:3]) + more, _loc(tuple(errors[0].get("loc", ()))) if errors else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            ctx = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {})
            return error_response(400, f"the request body is not valid JSON: {ctx.get('error', 'parse error')}", code="invalid_json")
        message, param = validation_message(errors)
        return error_response(400, message, param)

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, exc: ValidationError):
        message, param = validation_message(exc.errors())
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        phrase = HTTPStatus(exc.status_code).phrase if exc.status_code in HTTPStatus._value2member_map_ else "error"
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else f"{phrase}: {request.method} {request.url.path}"
        return error_response(exc.status_code, detail)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}")
