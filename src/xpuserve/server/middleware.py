"""Checks done on the raw request before routing: API key, body size, UTF-8."""

from __future__ import annotations

import hmac

from xpuserve.server.errors import raw_error

GUARDED = ("/v1/", "/tokenize", "/detokenize")  # /health, /metrics and /version stay open, as in vLLM


class RequestGuard:
    """Pure ASGI middleware (BaseHTTPMiddleware would get in the way of streaming and disconnects)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.api_key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(GUARDED):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and not self._authorized(headers.get(b"authorization", b"")):
            return await _answer(send, *raw_error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "invalid_api_key"))
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _answer(send, *self._too_large())
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await _answer(send, *self._too_large())
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await _answer(send, *raw_error(400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})"))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect

        await self.app(scope, replay, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")  # bytes: compare_digest refuses non-ASCII str
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    def _too_large(self):
        return raw_error(413, f"the request body exceeds {self.max_body_bytes} bytes", "request_too_large")


async def _answer(send, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
