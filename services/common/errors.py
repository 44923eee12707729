"""One error body for every service, and the one table that maps typed errors to HTTP statuses."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from advexplain.shared.errors import (
    AdvexplainError,
    CheckpointError,
    DataError,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)


class ServiceError(AdvexplainError):
    """An error only a service raises. `headers` go out with its answer (Retry-After, WWW-Authenticate);
    the library's errors carry none, so HTTP stays out of advexplain.shared."""

    code = "service_error"

    def __init__(self, message: str, headers: Mapping[str, str] | None = None, **details: object):
        super().__init__(message, **details)
        self.headers = dict(headers or {})


class ServiceNotReady(ServiceError):
    """The model is not loaded (yet): the service answers /healthz and /metrics only."""

    code = "not_ready"


class Overloaded(ServiceError):
    """Refused at the door (services/common/admission.py): the queue is full, or the wait for a slot ran
    out. A 503 with Retry-After, so a client can tell a busy service from a dead one."""

    code = "overloaded"


class Unauthorized(ServiceError):
    """No bearer token on a route that needs one (answered with WWW-Authenticate)."""

    code = "unauthorized"


class Forbidden(ServiceError):
    """A bearer token that is not valid for the route."""

    code = "forbidden"


# The single error -> status table. Lookup walks the exception's MRO, so a subclass without its own
# row gets its nearest ancestor's status (UnsupportedMediaType is an InvalidInput but has 415).
STATUS: dict[type[AdvexplainError], int] = {
    InvalidInput: 400,
    DataError: 400,
    UnsupportedMediaType: 415,
    PayloadTooLarge: 413,
    Unauthorized: 401,
    Forbidden: 403,
    UpstreamError: 502,
    UpstreamBadResponse: 502,
    UpstreamUnavailable: 503,
    UpstreamTimeout: 504,
    ServiceNotReady: 503,
    Overloaded: 503,
    CheckpointError: 500,
    AdvexplainError: 500,
}

# Codes for the statuses Starlette raises itself (routing, body limits, form parsing).
HTTP_CODES = {
    400: "invalid_input",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    431: "headers_too_large",
}


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """`{"error": {"code": "...", "message": "..."}}`: the body of every non-2xx answer."""

    error: ErrorDetail


def status_for(exc: AdvexplainError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


DESCRIPTIONS = {
    400: "Invalid input (not an image, truncated or corrupt file, bad header)",
    401: "Missing or wrong credentials",
    403: "Not allowed",
    413: "Too many files, body over the byte limit, or an image over the pixel limit",
    415: "Not an image, or an image format that is not accepted",
    422: "The request does not have the documented form (e.g. no `image` field)",
    431: "Too many header lines, or too many bytes of headers",
    502: "The black box gave an unusable answer",
    503: "Not ready, overloaded (`overloaded`, with Retry-After), or the black box is unreachable",
    504: "The black box did not answer in time",
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses=` entries for the given statuses, all with the one error body."""
    return {s: {"model": ErrorBody, "description": DESCRIPTIONS.get(s, "Error")} for s in statuses}


def _typed_cause(exc: BaseException) -> AdvexplainError | None:
    seen = 0
    link = exc.__cause__ or exc.__context__
    while link is not None and seen < 5:
        if isinstance(link, AdvexplainError):
            return link
        link, seen = link.__cause__ or link.__context__, seen + 1
    return None


OnError = Callable[[str, int], None]


def install_error_handlers(app: FastAPI, on_error: OnError | None = None) -> None:
    """Register the handler map on `app`; `on_error(code, status)` sees every error answer (metrics)."""

    def answer(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        if on_error is not None:
            on_error(code, status)
        return error_response(status, code, message, headers)

    async def domain_error(request: Request, exc: AdvexplainError) -> JSONResponse:
        status = status_for(exc)
        if isinstance(exc, Overloaded):
            # One per refused request under overload: the admission metric counts them, the log need not.
            log.debug("%s %s refused: %s", request.method, request.url.path, exc.message)
        elif status >= 500:
            log.error("%s %s failed: %s: %s", request.method, request.url.path, exc.code, exc.message)
        return answer(status, exc.code, exc.message, exc.headers if isinstance(exc, ServiceError) else None)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return answer(422, "validation_error", "; ".join(parts) or "invalid request")

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI wraps anything raised while it parses the body (e.g. the byte limit, raised from
        # `receive`) in a 400; answer the typed error that caused it instead.
        typed = _typed_cause(exc)
        if typed is not None:
            return await domain_error(request, typed)
        status = exc.status_code
        message = str(exc.detail)
        code = HTTP_CODES.get(status, "http_error")
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, MultiPartException):
            # Starlette turns every form-parsing failure into a 400; the file-count limit is a size limit.
            message = f"malformed multipart body: {cause.message}"
            if cause.message.startswith("Too many files"):
                status, code = 413, "payload_too_large"
        elif status == 413:
            message = "request body is over the byte limit"
        return answer(status, code, message, getattr(exc, "headers", None))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return answer(500, "internal_error", "internal server error")

    app.add_exception_handler(AdvexplainError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
