"""Response schemas of the black-box API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    label: str = Field(description="the predicted class")
    index: int = Field(ge=0, description="its position in the class list")
    probabilities: dict[str, float] | None = Field(
        None, description="class -> probability; absent when the service runs with output=label"
    )


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(description="one per uploaded file, in request order")
    queries: int = Field(ge=1, description="images classified (and counted) for this request")


class Health(BaseModel):
    status: Literal["ready", "loading"]
    classes: list[str] | None = Field(None, description="class names in index order, once ready")
    output: Literal["proba", "label"] | None = None
    image_size: int | None = None
    max_images: int | None = None
