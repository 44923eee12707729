"""Response schemas of the black-box API. The /predict answer is the wire contract in shared/wire.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: Literal["ready", "loading"]
    classes: list[str] | None = Field(None, description="class names in index order, once ready")
    output: Literal["proba", "label"] | None = None
    image_size: int | None = None
    max_images: int | None = None
