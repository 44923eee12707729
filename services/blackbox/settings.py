"""Black-box service settings: CLI flags or BLACKBOX_* environment variables, validated before anything loads."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from advexplain.services.common.settings import ServiceSettings, checkpoint_problem


class BlackboxSettings(ServiceSettings):
    """Every field can be set as BLACKBOX_<NAME> (e.g. BLACKBOX_MAX_IMAGES=32); explicit arguments win."""

    model_config = SettingsConfigDict(env_prefix="BLACKBOX_", extra="forbid", frozen=True)

    model: Path = Field(Path("models/blackbox"), description="checkpoint folder (config.json + model.safetensors)")
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=0, le=65535)
    output: Literal["proba", "label"] = Field("proba", description="'label' makes a hard-label black box")
    protocol: Literal["predict", "oip"] = Field(
        "predict", description="'predict': our POST /predict; 'oip': Open Inference Protocol v2 REST through "
                               "KServe's model server (the kserve extra)")
    name: str = Field("blackbox", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
                      description="the model's name in OIP paths (/v2/models/<name>); protocol oip only")
    max_images: int = Field(64, ge=1, le=1024, description="files per request")
    max_upload_bytes: int = Field(10_000_000, ge=1024, description="whole request body, bytes")
    max_pixels: int = Field(40_000_000, ge=1, description="width x height of one image, checked before decoding")
    threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads (default: leave the process's)")
    workers: int = Field(1, ge=1, le=64, description="forward passes running at once")
    max_queue: int = Field(64, ge=0, le=1_000_000, description="requests that may wait for a forward pass; one more "
                           "is refused at once with 503 overloaded and Retry-After (0: none wait)")
    max_queue_wait: float = Field(5.0, gt=0, le=86_400, description="seconds a request may wait for a forward pass "
                                  "before it is refused with 503 overloaded")
    max_client_labels: int = Field(100, ge=1, le=10_000, description="distinct client ids with their own metric label")
    max_clients: int = Field(10_000, ge=1, le=1_000_000,
                             description="client ids with their own running total in memory (least recently used "
                                         "first out; evicted counts stay in the total)")

    @field_validator("model")
    @classmethod
    def _checkpoint_exists(cls, value: Path) -> Path:
        if problem := checkpoint_problem(value):
            raise ValueError(problem)
        return value
