"""Request limits as pure ASGI middleware: the body byte limit while it streams in, and request-head limits."""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from advexplain.services.common.errors import error_response
from advexplain.shared.errors import PayloadTooLarge


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with PayloadTooLarge, raised from `receive`.

    A Content-Length over the limit fails the first `receive` before a single byte is read; a body
    without one (chunked) fails as soon as the running total passes the limit. The error travels
    through the app's handler map like any other, so it gets the one error body and is counted.
    Starlette's own limiter is not used because it replaces any answer with a plain-text 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        limit = self.max_bytes
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit}")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


# Request-head limits, checked by the app itself: uvicorn's h11 parser only caps a head that is still
# incomplete after a read (16 KiB), so on loopback a 60 kB header or 10,000 header lines arriving in one
# read get through, and whether a large head is refused depends on how TCP split it.
MAX_HEADER_BYTES = 32 * 1024
MAX_HEADERS = 100


class HeaderLimitMiddleware:
    """Answers 431 (the one error body) when a request has over `max_count` header lines or over
    `max_bytes` of header names and values, before the app runs or the body is read."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_HEADER_BYTES, max_count: int = MAX_HEADERS,
                 on_error: Callable[[str, int], None] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers") or []
            size = sum(len(name) + len(value) for name, value in headers)
            if len(headers) > self.max_count or size > self.max_bytes:
                if self.on_error is not None:
                    self.on_error("headers_too_large", 431)
                message = (f"{len(headers)} header lines / {size} bytes of headers; the limits are "
                           f"{self.max_count} lines and {self.max_bytes} bytes")
                await error_response(431, "headers_too_large", message, {"Connection": "close"})(scope, receive, send)
                return
        await self.app(scope, receive, send)
