"""The white-box route's bearer token: one check, applied before the request body is read."""

from __future__ import annotations

import secrets

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from advexplain.services.common.errors import Forbidden, OnError, ServiceError, Unauthorized, error_response

WHITEBOX_PREFIX = "/internal/"


def token_problem(authorization: bytes | None, expected: SecretStr) -> ServiceError | None:
    """None when `authorization` (the raw header bytes) is `Bearer <expected>`, else the error to answer.

    Raw bytes, not Starlette's latin-1 text, so a non-ASCII token compares as the UTF-8 it was set as;
    the comparison is constant-time so it does not reveal how much of the token matched. No message
    repeats what was sent.
    """
    scheme, _, credentials = (authorization or b"").partition(b" ")
    credentials = credentials.strip(b" ")
    if scheme.lower() != b"bearer" or not credentials:
        return Unauthorized("this route needs `Authorization: Bearer <token>`", headers={"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(credentials, expected.get_secret_value().encode("utf-8")):
        return Forbidden("the token is not valid for this route")
    return None


class TokenGuardMiddleware:
    """Refuses every request under `/internal/` without the right bearer token before the app runs.

    FastAPI reads and parses a multipart body before it resolves dependencies, so a route dependency
    alone would let anyone without the token make the service buffer (up to the byte limit) and parse
    a body. Here the headers decide, `receive` is never called, and the answer is the one error body.
    The route keeps its own dependency too (defence in depth, and the OpenAPI security scheme).
    """

    def __init__(self, app: ASGIApp, token: SecretStr, on_error: OnError | None = None, prefix: str = WHITEBOX_PREFIX):
        self.app = app
        self.token = token
        self.on_error = on_error
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith(self.prefix):
            raw = dict(Headers(scope=scope).raw).get(b"authorization")
            problem = token_problem(raw, self.token)
            if problem is not None:
                status = 401 if isinstance(problem, Unauthorized) else 403
                if self.on_error is not None:
                    self.on_error(problem.code, status)
                # Not keeping the connection: the unread body must not be parsed as the next request.
                headers = {**problem.headers, "Connection": "close"}
                await error_response(status, problem.code, problem.message, headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)
