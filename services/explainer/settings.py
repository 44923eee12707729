"""Explainer settings: CLI flags or EXPLAINER_* environment variables, validated before anything loads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import httpx
from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from advexplain.services.common.settings import ServiceSettings, checkpoint_problem, usable_cpus
from advexplain.shared.devices import pick_device
from advexplain.shared.explain.base import MAX_QUERIES_LIMIT
from advexplain.shared.oip import is_oip_url
from advexplain.shared.wire import CLIENT_ID, CLIENT_ID_RULE

MIN_TOKEN_LENGTH = 16
QUEUE_PER_SLOT = 4
# Images per batched surrogate pass on a GPU (32 concurrent searches x 6 views fit many times over).
DEFAULT_SURROGATE_BATCH = 512


def split_list(value, what: str):
    """A list setting from the environment or a flag: a JSON list, or comma-separated; empty = None."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return None
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON list of {what}: {exc}") from exc
    return [part.strip() for part in text.split(",")]


class ExplainerSettings(ServiceSettings):
    """Every field can be set as EXPLAINER_<NAME>; explicit arguments win over the environment.

    EXPLAINER_SURROGATE takes one path, a comma-separated list or a JSON list (several surrogates
    make an ensemble). EXPLAINER_WHITEBOX_TOKEN set to an empty string means the white-box route is off.
    """

    # hide_input_in_errors: a validation error must never echo the token back (logs, tracebacks).
    model_config = SettingsConfigDict(env_prefix="EXPLAINER_", extra="forbid", frozen=True, hide_input_in_errors=True)

    surrogate: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path("models/surrogate")],
        description="surrogate checkpoint folder(s); more than one makes an ensemble (summed gradients)",
    )
    blackbox_url: str = Field("http://127.0.0.1:8000", description="base URL of the black-box service, or an Open "
                              "Inference Protocol model URL http(s)://host:port/v2/models/<name>[/versions/<v>]")
    oip_pixel_scale: float = Field(1.0, description="OIP black box with FP32 input: 1 sends pixels in [0, 1], 255 "
                                   "in [0, 255]")
    oip_mean: Annotated[list[float], NoDecode] | None = Field(
        None, description="OIP black box with FP32 input: per-channel mean subtracted after scaling (1 or 3 values, "
                          "in the scale's units); with oip_std")
    oip_std: Annotated[list[float], NoDecode] | None = Field(
        None, validate_default=True, description="OIP black box with FP32 input: per-channel std divided by after "
                                                 "the mean; with oip_mean")
    whitebox_model: Path | None = Field(None, description="the real model's checkpoint, for /internal/whitebox/explain")
    whitebox_token: SecretStr | None = Field(
        None, description="bearer token of the white-box route; unset or empty = off"
    )
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8001, ge=0, le=65535)
    client_id: str = Field("advexplain-explainer", description="X-Client-Id sent to the black box")
    connect_timeout: float = Field(5.0, gt=0, le=300, description="seconds to connect to the black box")
    read_timeout: float = Field(30.0, gt=0, le=3600, description="seconds to wait for one black-box answer")
    connect_retries: int = Field(
        2, ge=0, le=10, description="retries of failed connects only (a sent POST is never resent)"
    )
    blackbox_connections: int = Field(8, ge=1, le=256, description="pooled connections to the black box")
    health_timeout: float = Field(2.0, gt=0, le=60, description="seconds /healthz waits for the black box")
    workers: int = Field(1, ge=1, le=64, description="explainer processes on one port (uvicorn workers); the "
                         "concurrency, queue and threads below are per process")
    max_concurrency: int = Field(None, ge=1, le=256, validate_default=True,
                                 description="explanations running at once in each process (default: the usable "
                                             "cores / workers, at least 1)")
    max_queue: int = Field(None, ge=0, le=1_000_000, validate_default=True,
                           description="explanations that may wait for a slot in each process; one more is refused "
                                       "at once with 503 overloaded and Retry-After (default: 4 per slot)")
    max_queue_wait: float = Field(10.0, gt=0, le=86_400, description="seconds an explanation may wait for a slot "
                                  "before it is refused with 503 overloaded")
    max_upload_bytes: int = Field(10_000_000, ge=1024, description="whole request body, bytes")
    max_pixels: int = Field(40_000_000, ge=1, description="width x height of the upload, checked before decoding")
    max_queries: int = Field(200, ge=1, le=MAX_QUERIES_LIMIT, description="upper limit of a request's max_queries")
    max_side: int | None = Field(1024, ge=16, le=65536, description="uploads with a longer side are downscaled "
                                 "to it once, up front (aspect ratio kept), and the answer says so; 0 or empty = never")
    classes: Annotated[list[str], NoDecode] | None = Field(
        None, description="class names in index order, as the black box labels them (default: the surrogate's)")
    surrogate_batch: int = Field(None, ge=0, le=65_536, validate_default=True,
                                 description="most images in one surrogate pass shared by the concurrent "
                                             "explanations of a process (their work batched, bench/batching.py); 0 = "
                                             "off, each explanation runs its own passes (default: 512 on a CUDA "
                                             "device, 0 on the CPU, where batching measured slower)")
    threads: int = Field(None, ge=1, le=256, validate_default=True,
                         description="torch CPU threads of each explanation (default: the usable cores / (workers x "
                                     "max_concurrency), at least 1, so the cores are never oversubscribed)")

    @field_validator("surrogate", mode="before")
    @classmethod
    def _split_paths(cls, value):
        if isinstance(value, (str, Path)):
            text = str(value).strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not a JSON list of paths: {exc}") from exc
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("surrogate")
    @classmethod
    def _surrogates_exist(cls, value: list[Path]) -> list[Path]:
        if not value:
            raise ValueError("at least one surrogate checkpoint is needed")
        problems = [p for p in map(checkpoint_problem, value) if p]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    # Defaults that follow the machine and each other (fields validate in the order they are declared).
    @field_validator("max_concurrency", mode="before")
    @classmethod
    def _default_concurrency(cls, value, info: ValidationInfo):
        if value is None or value == "":
            return max(1, usable_cpus() // info.data.get("workers", 1))
        return value

    @field_validator("max_queue", mode="before")
    @classmethod
    def _default_queue(cls, value, info: ValidationInfo):
        if value is None or value == "":
            return QUEUE_PER_SLOT * info.data.get("max_concurrency", 1)
        return value

    @field_validator("threads", mode="before")
    @classmethod
    def _default_threads(cls, value, info: ValidationInfo):
        if value is None or value == "":
            return max(1, usable_cpus() // (info.data.get("workers", 1) * info.data.get("max_concurrency", 1)))
        return value

    @field_validator("surrogate_batch", mode="before")
    @classmethod
    def _default_batch(cls, value, info: ValidationInfo):
        if value is None or value == "":
            device = info.data.get("device", "auto")
            return DEFAULT_SURROGATE_BATCH if pick_device(device).type == "cuda" else 0
        return value

    @field_validator("max_side", mode="before")
    @classmethod
    def _no_side_limit(cls, value):
        return None if value in (0, "0", "", "none", "None") else value

    @field_validator("classes", mode="before")
    @classmethod
    def _split_classes(cls, value):
        return split_list(value, "class names")

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) < 2 or len(set(value)) != len(value) or not all(value)):
            raise ValueError("classes must be at least two distinct, non-empty names")
        return value

    @field_validator("whitebox_model", mode="before")
    @classmethod
    def _empty_model_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("whitebox_model")
    @classmethod
    def _whitebox_exists(cls, value: Path | None) -> Path | None:
        if value is not None and (problem := checkpoint_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("whitebox_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value):
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if isinstance(raw, str) and raw == "" else value

    @field_validator("whitebox_token")
    @classmethod
    def _token_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        # The message never repeats the value.
        if value is not None:
            secret = value.get_secret_value()
            if len(secret) < MIN_TOKEN_LENGTH or secret != secret.strip() or not secret.isprintable():
                raise ValueError(
                    f"whitebox_token must be at least {MIN_TOKEN_LENGTH} printable characters "
                    "without surrounding spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
        return value

    @field_validator("blackbox_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ValueError(f"blackbox_url is not a URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"blackbox_url must be an http(s) URL with a host, got {value!r}")
        if url.query or url.fragment:
            raise ValueError("blackbox_url must not have a query or fragment")
        return value.rstrip("/")

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str) -> str:
        if not CLIENT_ID.fullmatch(value):
            raise ValueError(f"client_id must be {CLIENT_ID_RULE}")
        return value

    # How an OIP model wants FP32 pixels; a /predict black box takes image files, so there they are refused.
    @field_validator("oip_pixel_scale")
    @classmethod
    def _pixel_scale(cls, value: float, info) -> float:
        if value not in (1.0, 255.0):
            raise ValueError(f"oip_pixel_scale must be 1 ([0, 1] pixels) or 255 ([0, 255] pixels), got {value:g}")
        if value != 1.0:
            _needs_oip_url(info, "oip_pixel_scale")
        return value

    @field_validator("oip_mean", "oip_std", mode="before")
    @classmethod
    def _split_numbers(cls, value):
        return split_list(value, "numbers")

    @field_validator("oip_mean")
    @classmethod
    def _mean(cls, value: list[float] | None, info) -> list[float] | None:
        if value is not None:
            if len(value) not in (1, 3) or not all(math.isfinite(v) for v in value):
                raise ValueError("oip_mean needs 1 or 3 finite values (one per channel)")
            _needs_oip_url(info, "oip_mean")
        return value

    @field_validator("oip_std")
    @classmethod
    def _std(cls, value: list[float] | None, info) -> list[float] | None:
        if "oip_mean" not in info.data:
            return value  # oip_mean itself failed; its error says why
        mean = info.data["oip_mean"]
        if (mean is None) != (value is None):
            raise ValueError("give oip_mean and oip_std together, or neither")
        if value is not None:
            if len(value) != len(mean) or not all(math.isfinite(v) and v > 0 for v in value):
                raise ValueError(f"oip_std needs {len(mean)} finite values > 0, as many as oip_mean")
        return value


    @property
    def whitebox_enabled(self) -> bool:
        """The white-box route exists only with both a token and a model."""
        return self.whitebox_token is not None and self.whitebox_model is not None


def _needs_oip_url(info, field: str) -> None:
    url = info.data.get("blackbox_url")
    if url is not None and not is_oip_url(url):
        raise ValueError(f"{field} applies to an Open Inference Protocol black box "
                         f"(http(s)://host:port/v2/models/<name>); {url} takes image files over /predict")
