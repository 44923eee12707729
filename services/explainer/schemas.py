"""Response schemas of the explainer API."""

from __future__ import annotations

import base64
from typing import Literal

from pydantic import BaseModel, Field

from advexplain.services.explainer.service import ExplainResult


class Images(BaseModel):
    """Base64-encoded PNGs (standard alphabet, padded), all at the photo's size but the panel."""

    saliency: str = Field(description="Algorithm 2's saliency map as a heat map (black when the search failed)")
    overlay: str = Field(description="the heat map over the uploaded photo")
    adversarial: str = Field(description="the inverted adversarial example: the photo plus the change, 8-bit, at "
                                         "the photo's size; posted to the black box it is classified as `target`")
    panel: str = Field(description="original | adversarial | saliency with the predictions (the paper's Figure 2)")


class TraceStep(BaseModel):
    query: int = Field(description="running number of the oracle query")
    prediction: int = Field(description="class index the oracle answered")
    step: str | None = None
    epsilon: float | None = None
    margin: float | None = None

    model_config = {"extra": "allow"}


class ExplainResponse(BaseModel):
    success: bool = Field(description="the oracle classifies a change of at most max_linf as the target (or "
                                      "already did)")
    already_correct: bool = Field(description="the model already predicts the target; one query spent")
    queries: int = Field(ge=0, description="images sent to the black box for this explanation, the first prediction "
                                           "included (equals its X-Query-Count delta)")
    search_queries: int = Field(ge=0, description="queries - 1, the number the paper reports")
    label: str = Field(description="the true label")
    target: str = Field(description="the class the change makes the model predict (the label unless asked)")
    original_prediction: str = Field(description="what the model predicted for the upload as sent")
    final_prediction: str = Field(description="what it predicted for the last image the search sent")
    classes: list[str] = Field(description="class names in index order")
    method: str
    failure_reason: str | None = Field(description="why the search failed: max_queries (budget spent), max_linf "
                                                   "(no change within max_linf), alpha (paper: eps reached alpha), "
                                                   "no_gradient; null on success")
    epsilon: float | None = Field(description="step size of the accepted candidate (method paper); null otherwise")
    l2: float | None = Field(description="L2 norm of the change in [0,1] pixel units; null on failure")
    linf: float | None = Field(description="largest per-pixel change in [0,1] pixel units; null on failure")
    rms: float | None = Field(description="root mean square of the change in [0,1] pixel units; null on failure")
    width: int = Field(description="width of the explained photo (and of every image but the panel)")
    height: int = Field(description="its height")
    original_width: int = Field(description="width of the upload as sent")
    original_height: int = Field(description="height of the upload as sent")
    downscaled: bool = Field(description="the upload was larger than the service's max_side and was downscaled "
                                         "once, before anything else; the explanation is of the downscaled photo")
    budget_exhausted: bool = Field(description="the search stopped because max_queries was spent")
    max_queries: int
    max_linf: float
    refine: int
    alpha: float | None = Field(description="the paper's bound on eps (method paper); null otherwise")
    saliency: str | None = Field(description="what the saliency map shows: detail (the photo's detail that the "
                                             "change works against) or change (the change's magnitude, the paper's "
                                             "map); a detail map with no pixel falls back to change; null without "
                                             "a change")
    tau: float
    beta: float
    seconds: float = Field(description="time the search took, in-process")
    trace: list[TraceStep] = Field(description="every oracle query: what was tried and what came back")
    images: Images


def response_from(result: ExplainResult, with_images: bool = True) -> ExplainResponse:
    e, p, options = result.explanation, result.params, result.params.options
    name, summary = e.classes.__getitem__, e.to_dict()
    (width, height), (original_width, original_height) = result.photo.size, result.photo.original_size
    images = {k: base64.b64encode(v).decode("ascii") if with_images else "" for k, v in result.pngs.items()}
    return ExplainResponse(
        success=e.success, already_correct=e.already_correct, queries=e.queries, search_queries=e.search_queries,
        label=name(e.label), target=name(e.target), original_prediction=name(e.original_prediction),
        final_prediction=name(e.final_prediction), classes=list(e.classes), method=e.method,
        failure_reason=e.failure_reason, epsilon=summary["epsilon"], l2=summary["l2"], linf=summary["linf"],
        rms=summary["rms"], width=width, height=height, original_width=original_width,
        original_height=original_height, downscaled=result.photo.downscaled, budget_exhausted=e.budget_exhausted,
        max_queries=options.max_queries, max_linf=options.max_linf, refine=options.refine,
        alpha=getattr(options, "alpha", None), saliency=result.saliency, tau=p.tau, beta=p.beta, seconds=e.seconds,
        trace=summary["trace"],
        images=Images(**images),
    )


def explanation_headers(result: ExplainResult) -> dict[str, str]:
    """The numbers of the JSON answer as X-Explanation-* headers (for Accept: image/png); nulls are left out."""
    body = response_from(result, with_images=False).model_dump(exclude={"images", "trace", "classes"})
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
