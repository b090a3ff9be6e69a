"""Errors as A1111's API answers them: JSON `{error, detail, body, errors}` with a 4xx for what a client did wrong.

    ApiError(400, "Sampler not found: 'x'")    what the server refuses, with its status
    InvalidInputError (sdtorch's bad input)     422: a value out of range or over a limit, an undecodable image
    RequestValidationError (pydantic)           422: malformed JSON, a wrong type
    any other exception                         500, named; the server goes on
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import InvalidInputError, SdtorchError

log = logging.getLogger("sdtorch.server")
_MAX_BODY_ECHO = 1000  # characters of a refused body sent back


class ApiError(Exception):
    """A refusal with an HTTP status and a message that says what to do."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code, self.detail = status_code, detail


def error_response(status: int, error: str, detail: str, body: Any = "", errors: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """A1111's error body: `errors` repeats the detail unless a list of field errors is given."""
    content = {"error": error, "detail": detail, "body": body, "errors": detail if errors is None else errors}
    return JSONResponse(jsonable_encoder(content), status_code=status, headers=headers)


def _body_text(body: Any) -> Any:
    """The refused body as text, cut short; a body that parsed as JSON is not sent back."""
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", errors="replace")
    if isinstance(body, str) and len(body) > _MAX_BODY_ECHO:
        return body[:_MAX_BODY_ECHO] + "..."
    return body if isinstance(body, (str, type(None))) else ""  # a parsed body is the client's own: not echoed


def _field_errors(e: RequestValidationError) -> list[dict[str, Any]]:
    """pydantic's errors without their context objects: [{loc, msg, type}] (a JSON error says why)."""
    errors = []
    for err in e.errors():
        reason = (err.get("ctx") or {}).get("error")
        msg = err.get("msg", "") + (f" ({reason})" if err.get("type") == "json_invalid" and reason else "")
        errors.append({"loc": list(err.get("loc", ())), "msg": msg, "type": err.get("type", "")})
    return errors


def _where(err: dict[str, Any]) -> str:
    """Where in the body an error is: a field ("override_settings.x"), or the character where JSON broke."""
    if err["type"] == "json_invalid":
        return f"body, character {err['loc'][-1]}"
    return ".".join(str(part) for part in err["loc"] if part != "body") or "body"


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in A1111's JSON shape."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status_code, "HTTPException", e.detail)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:  # unknown paths, wrong methods
        return error_response(e.status_code, "HTTPException", str(e.detail), headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = _field_errors(e)
        detail = "; ".join(f"{_where(err)}: {err['msg']}" for err in errors)
        return error_response(422, "RequestValidationError", detail, _body_text(e.body), errors)

    @app.exception_handler(InvalidInputError)
    async def invalid_input(_: Request, e: InvalidInputError) -> JSONResponse:
        return error_response(422, type(e).__name__, str(e))

    @app.exception_handler(SdtorchError)
    async def sdtorch_error(_: Request, e: SdtorchError) -> JSONResponse:  # a model that fails to load, NaNs
        log.error("%s: %s", type(e).__name__, e)
        return error_response(500, type(e).__name__, str(e))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, type(e).__name__, f"internal error: {e}")
