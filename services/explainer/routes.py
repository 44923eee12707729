"""Routes of the explainer API: /explain, /internal/whitebox/explain (token), /healthz, /metrics."""

from __future__ import annotations

from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from advexplain.services.common.errors import ServiceNotReady, error_responses
from advexplain.services.common.images import read_upload
from advexplain.services.explainer.auth import token_problem
from advexplain.services.explainer.schemas import ExplainResponse, Health, explanation_headers, response_from
from advexplain.services.explainer.service import BLACKBOX, WHITEBOX, Explainer, ExplainParams, ExplainResult
from advexplain.shared.errors import InvalidInput
from advexplain.shared.explain import (
    DEFAULT_ALPHA,
    DEFAULT_MAX_LINF,
    DEFAULT_MAX_QUERIES,
    DEFAULT_METHOD,
    MAX_ALPHA,
    METHODS,
    method_options,
)
from advexplain.shared.saliency import DEFAULT_BETA, DEFAULT_TAU, SALIENCY_SOURCES

router = APIRouter()
whitebox_router = APIRouter()

MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]
SaliencyName = Literal[tuple(SALIENCY_SOURCES)]  # type: ignore[valid-type]


def get_explainer(request: Request) -> Explainer:
    explainer = getattr(request.app.state, "explainer", None)
    if explainer is None:
        raise ServiceNotReady("the surrogate is not loaded yet")
    return explainer


def explain_params(
    explainer: Annotated[Explainer, Depends(get_explainer)],
    label: Annotated[str, Form(min_length=1, max_length=200, description="the true label: a class name or its index")],
    target: Annotated[
        str | None,
        Form(
            min_length=1,
            max_length=200,
            description="the class the change should make the model predict (a name or an index); default: the label",
        ),
    ] = None,
    method: Annotated[MethodName, Form(description="search method")] = DEFAULT_METHOD,
    max_queries: Annotated[
        int,
        Form(
            ge=1,
            description="most images sent to the oracle, the first prediction "
            "included (the service's own limit applies)",
        ),
    ] = DEFAULT_MAX_QUERIES,
    max_linf: Annotated[
        float,
        Form(
            gt=0,
            le=1,
            allow_inf_nan=False,
            description="largest per-pixel change of a success, in [0, 1] pixel units (a larger change is a failure)",
        ),
    ] = DEFAULT_MAX_LINF,
    refine: Annotated[
        int | None,
        Form(ge=0, description="extra queries spent shrinking a found change (margin methods); default: the method's"),
    ] = None,
    saliency: Annotated[
        SaliencyName | None,
        Form(description="what the saliency map shows: `detail`, the photo's detail that the change works against "
                         "(the change's dot product with blur(photo) - photo, per pixel), or `change`, the change's "
                         "magnitude (the paper's map); default: the method's (`change` for paper, `detail` otherwise)"),
    ] = None,
    tau: Annotated[float, Form(gt=0, allow_inf_nan=False, description="Algorithm 2's relaxation")] = DEFAULT_TAU,
    beta: Annotated[float, Form(gt=1, allow_inf_nan=False, description="Algorithm 2's boost")] = DEFAULT_BETA,
    alpha: Annotated[
        float | None,
        Form(
            gt=0,
            le=MAX_ALPHA,
            allow_inf_nan=False,
            description=f"bound on the paper's epsilon (method paper only; default {DEFAULT_ALPHA})",
        ),
    ] = None,
) -> ExplainParams:
    limit = explainer.settings.max_queries
    if max_queries > limit:
        raise InvalidInput(f"max_queries {max_queries} is over this service's limit of {limit}")
    given = {"max_queries": max_queries, "max_linf": max_linf}
    if refine is not None:
        given["refine"] = refine
    if alpha is not None:
        if method != "paper":
            raise InvalidInput(f"alpha is the paper's bound on eps: method {method!r} does not take it")
        given["alpha"] = alpha
    return ExplainParams(label=label, target=target, method=method, options=method_options(method, **given),
                         tau=tau, beta=beta, saliency=saliency)


ExplainerDep = Annotated[Explainer, Depends(get_explainer)]
ParamsDep = Annotated[ExplainParams, Depends(explain_params)]
Upload = Annotated[UploadFile, File(description="the image (PNG, JPEG, WebP, BMP, GIF first frame)")]

EXPLAIN_RESPONSES = {
    200: {
        "description": "The explanation; a failed search is a 200 with `success: false`. With `Accept: image/png` "
                       "the body is the panel PNG and the numbers are in `X-Explanation-*` headers.",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    },
}


def wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return "image/png" in accept and "application/json" not in accept


def answer(request: Request, result: ExplainResult) -> Response:
    if wants_png(request):
        return Response(result.pngs["panel"], media_type="image/png", headers=explanation_headers(result))
    return JSONResponse(response_from(result).model_dump(mode="json"))


@router.post(
    "/explain",
    response_model=ExplainResponse,
    summary="Explain why the black box misclassifies an image",
    responses={**EXPLAIN_RESPONSES, **error_responses(400, 413, 415, 422, 502, 503, 504)},
)
async def explain_blackbox(request: Request, image: Upload, params: ParamsDep, explainer: ExplainerDep) -> Response:
    data = await read_upload(image, explainer.settings.max_upload_bytes)
    return answer(request, await explainer.explain(data, params, BLACKBOX))


bearer = HTTPBearer(auto_error=False, description="EXPLAINER_WHITEBOX_TOKEN")


def require_token(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    # TokenGuardMiddleware has already refused bad tokens before the body was read; this is the same
    # check again, on the raw header, in case the route is ever mounted without the middleware.
    raw = request.headers.get("authorization")
    problem = token_problem(None if raw is None else raw.encode("latin-1"), request.app.state.settings.whitebox_token)
    if problem is not None:
        raise problem


@whitebox_router.post(
    "/internal/whitebox/explain",
    response_model=ExplainResponse,
    summary="Developers: Algorithm 1 with the real model's gradients (no black-box queries)",
    dependencies=[Depends(require_token)],
    responses={**EXPLAIN_RESPONSES, **error_responses(400, 401, 403, 413, 415, 422, 503)},
)
async def explain_whitebox(request: Request, image: Upload, params: ParamsDep, explainer: ExplainerDep) -> Response:
    data = await read_upload(image, explainer.settings.max_upload_bytes)
    return answer(request, await explainer.explain(data, params, WHITEBOX))


@router.get("/healthz", response_model=Health, response_model_exclude_none=True,
            responses={503: {"model": Health, "description": "loading, or the black box does not answer"}})
async def healthz(request: Request) -> JSONResponse:
    explainer: Explainer | None = getattr(request.app.state, "explainer", None)
    if explainer is None:
        return JSONResponse(Health(status="loading", surrogate=False).model_dump(exclude_none=True), status_code=503)
    # Not under the explanation limiter: a busy explainer still answers its health check.
    answers, detail = await anyio.to_thread.run_sync(explainer.blackbox_health)
    health = Health(status="ready" if answers else "degraded", surrogate=True, surrogates=explainer.surrogates,
                    blackbox="ok" if answers else "unreachable", blackbox_detail=None if answers else detail,
                    classes=list(explainer.classes))
    return JSONResponse(health.model_dump(exclude_none=True), status_code=200 if answers else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)
