"""Every failure as an OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``.

Bad input is a 4xx answer, never an exception that reaches uvicorn; the server keeps serving.
"""

import json
import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

# OpenAI's error "type" for each status class the server returns.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
PROTECTED_PATH_PREFIX = "/v1/"  # paths that need the API key; /health and /metrics stay open to probes
MAX_QUOTED_INPUT_CHARS = 80  # of a rejected value quoted in a message (a rejected prompt may be megabytes)
# The names pydantic puts in an error's location for the member of a union that failed ("str", "list[int]").
UNION_MEMBER_TAGS = frozenset({"str", "int", "float", "bool", "none"})


class APIError(Exception):
    """An error the client caused (4xx) or the engine hit (5xx), with OpenAI's error fields."""

    def __init__(self, status_code: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code  # HTTP status of the answer
        self.message = message  # what went wrong and how to fix it
        self.param = param  # the request field at fault, if one is
        self.code = code  # a machine-readable reason, e.g. "model_not_found"


def error_body(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    error_type = ERROR_TYPES.get(status_code, "invalid_request_error" if status_code < 500 else "server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class ASCIIJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped. An error message may quote the client's text, and text that
    JSON can carry is not always valid UTF-8 (a lone surrogate, "\\ud800"): written raw, it would fail to encode
    and turn the answer into a dropped connection."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(error: APIError) -> JSONResponse:
    body = error_body(error.status_code, error.message, error.param, error.code)
    return ASCIIJSONResponse(body, error.status_code)


def quoted(value: object) -> str:
    """``repr(value)``, cut to MAX_QUOTED_INPUT_CHARS."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTED_INPUT_CHARS else text[:MAX_QUOTED_INPUT_CHARS] + "..."


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem pydantic found, as (message, offending field)."""
    errors = exc.errors()
    if not errors:
        return "the request body is invalid", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}; send a JSON object", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_union_member(part)]
    field = ".".join(loc) or None
    num_more = len(errors) - 1
    more = f" (and {num_more} more problem{'s' if num_more > 1 else ''})" if num_more else ""
    return f"{field or 'body'}: {first.get('msg')}, got {quoted(first.get('input'))}{more}", field


def _is_union_member(part: object) -> bool:
    return isinstance(part, str) and (part in UNION_MEMBER_TAGS or "[" in part)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message, field = _validation_message(exc)
        return error_response(APIError(400, message, param=field))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(APIError(exc.status_code, str(exc.detail)))

    async def on_unexpected_error(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error while serving %s", request.url.path)
        return error_response(APIError(500, f"internal server error: {type(exc).__name__}: {exc}"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)


class APIKeyMiddleware:
    """Refuse /v1/ requests without ``Authorization: Bearer <api_key>``, before their body is read.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware wraps `receive`, which hides a client's
    disconnect from the handlers.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PATH_PREFIX):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                message = "missing or wrong API key; send 'Authorization: Bearer <key>' with the server's --api-key"
                await error_response(APIError(401, message, code="invalid_api_key"))(scope, receive, send)
                return
        await self.app(scope, receive, send)
