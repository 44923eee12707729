"""Request body byte limit, enforced while the body streams in (pure ASGI, no buffering)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import PayloadTooLarge


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
