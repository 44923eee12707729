"""Response schemas of the explainer API."""

from __future__ import annotations

import base64
from typing import Literal

from pydantic import BaseModel, Field

from advexplain.services.explainer.service import ExplainResult


class Images(BaseModel):
    """Base64-encoded PNGs (standard alphabet, padded)."""

    saliency: str = Field(description="Algorithm 2's saliency map as a heat map (black when the search failed)")
    overlay: str = Field(description="the heat map over the uploaded image")
    adversarial: str = Field(description="the inverted adversarial example, 8-bit, at the model's input size; "
                                         "posted to the black box it is classified as the true label")
    panel: str = Field(description="original | adversarial | saliency with the predictions (the paper's Figure 2)")


class TraceStep(BaseModel):
    query: int = Field(description="running number of the oracle query")
    prediction: int = Field(description="class index the oracle answered")
    step: str | None = None
    epsilon: float | None = None
    margin: float | None = None

    model_config = {"extra": "allow"}


class ExplainResponse(BaseModel):
    success: bool = Field(description="an image classified as the true label was found (or it already was)")
    already_correct: bool = Field(description="the model already predicts the true label; one query spent")
    queries: int = Field(ge=0, description="images sent to the black box for this explanation, the first prediction "
                                           "included (equals its X-Query-Count delta)")
    search_queries: int = Field(ge=0, description="queries - 1, the number the paper reports")
    label: str = Field(description="the true label")
    original_prediction: str = Field(description="what the model predicted for the upload")
    final_prediction: str = Field(description="what it predicted for the last image the search sent")
    classes: list[str] = Field(description="class names in index order")
    method: str
    epsilon: float | None = Field(description="step size of the accepted candidate (method paper); null otherwise")
    l2: float | None = Field(description="L2 norm of the perturbation in [0,1] pixel units; null on failure")
    linf: float | None = Field(description="L-inf norm of the perturbation; null on failure")
    budget_exhausted: bool = Field(description="the search stopped because max_queries was spent")
    max_queries: int
    alpha: float
    tau: float
    beta: float
    seconds: float = Field(description="time the search took, in-process")
    trace: list[TraceStep] = Field(description="every oracle query: what was tried and what came back")
    images: Images


def response_from(result: ExplainResult) -> ExplainResponse:
    e, p = result.explanation, result.params
    name, summary = e.classes.__getitem__, e.to_dict()
    return ExplainResponse(
        success=e.success, already_correct=e.already_correct, queries=e.queries, search_queries=e.search_queries,
        label=name(e.label), original_prediction=name(e.original_prediction), final_prediction=name(e.final_prediction),
        classes=list(e.classes), method=e.method, epsilon=summary["epsilon"], l2=summary["l2"],
        linf=summary["linf"], budget_exhausted=e.budget_exhausted, max_queries=p.max_queries, alpha=p.alpha,
        tau=p.tau, beta=p.beta, seconds=e.seconds, trace=summary["trace"],
        images=Images(**{k: base64.b64encode(v).decode("ascii") for k, v in result.pngs.items()}),
    )


def explanation_headers(result: ExplainResult) -> dict[str, str]:
    """The numbers of the JSON answer as X-Explanation-* headers (for Accept: image/png); nulls are left out."""
    body = response_from(result).model_dump(exclude={"images", "trace", "classes"})
    out = {}
    for key, value in body.items():
        if value is None:
            continue
        header = "X-Explanation-" + "-".join(part.capitalize() for part in key.split("_"))
        out[header] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


class Health(BaseModel):
    status: Literal["ready", "loading", "degraded"] = Field(
        description="ready: surrogate loaded and the black box answers; degraded: the black box does not answer")
    surrogate: bool = Field(description="the surrogate(s) are loaded")
    surrogates: int | None = Field(None, description="how many (more than one: an ensemble)")
    blackbox: Literal["ok", "unreachable"] | None = None
    blackbox_detail: str | None = None
    classes: list[str] | None = None
    image_size: int | None = None
