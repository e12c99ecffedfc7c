"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         413: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_error", 500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}


class ErrorResponse(JSONResponse):
    """ASCII JSON: a message that quotes the client's input stays encodable, lone surrogates too."""

    def render(self, content) -> bytes:
        return json.dumps(content).encode()


def error_response(error: APIError) -> JSONResponse:
    return ErrorResponse(error_body(error.status, error.message, error.param, error.code), error.status, headers=error.headers)


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own errors (no route, wrong method, a body FastAPI could not parse) in OpenAI's shape."""
    message = str(e.detail)
    if e.__cause__ is not None:  # the parse error: a RecursionError for deep nesting, a ValueError for a 5,000-digit number
        message = f"the request body could not be parsed: {type(e.__cause__).__name__}: {str(e.__cause__).split(';')[0]}"
    return ErrorResponse(error_body(e.status_code, message), e.status_code, headers=e.headers)


async def internal_error(request: Request, e: Exception) -> JSONResponse:
    return ErrorResponse(error_body(500, f"internal error: {type(e).__name__}"), 500)


def raw_error(status: int, message: str, code: str | None = None) -> tuple[int, list, bytes]:
    """For ASGI middleware that answers before FastAPI sees the request."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    return status, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body
