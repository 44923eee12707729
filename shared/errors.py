"""Typed domain errors; the services map each to one HTTP status in a single handler table.

Nothing here knows HTTP: response headers and the errors only a service raises (not ready,
overloaded, credentials) live in services/common/errors.py.
"""

from __future__ import annotations


class AdvexplainError(Exception):
    """Base of every error advexplain raises on purpose. `code` is the stable machine-readable name."""

    code = "error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class DataError(AdvexplainError):
    code = "data_error"


class CheckpointError(AdvexplainError):
    code = "checkpoint_error"


class TrainingCollapsed(AdvexplainError):
    """The trained network predicts (almost) one class for every validation image."""

    code = "training_collapsed"


class InvalidInput(AdvexplainError):
    code = "invalid_input"


class UnsupportedMediaType(InvalidInput):
    code = "unsupported_media_type"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"


class UpstreamError(AdvexplainError):
    """The black box could not give an answer."""

    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    code = "blackbox_unavailable"


class UpstreamTimeout(UpstreamError):
    code = "blackbox_timeout"


class UpstreamBadResponse(UpstreamError):
    code = "blackbox_bad_response"
