"""Routes of the black-box API: /predict, /healthz, /metrics. Nothing else (no weights, logits or gradients)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Header, Request, Response, UploadFile
from fastapi.responses import JSONResponse

from advexplain.services.blackbox.counter import parse_client_id
from advexplain.services.blackbox.schemas import Health
from advexplain.services.blackbox.service import BlackBox
from advexplain.services.common.errors import ServiceNotReady, error_responses
from advexplain.services.common.images import read_upload
from advexplain.shared.errors import PayloadTooLarge
from advexplain.shared.wire import PredictResponse

router = APIRouter()


def get_blackbox(request: Request) -> BlackBox:
    blackbox = getattr(request.app.state, "blackbox", None)
    if blackbox is None:
        raise ServiceNotReady("the model is not loaded yet")
    return blackbox


def get_client(
    x_client_id: Annotated[str | None, Header(description="who is asking; default `anonymous`")] = None,
) -> str:
    return parse_client_id(x_client_id)


BlackBoxDep = Annotated[BlackBox, Depends(get_blackbox)]
ClientDep = Annotated[str, Depends(get_client)]
Images = Annotated[list[UploadFile], File(description="one or more images (PNG, JPEG, WebP, BMP, GIF first frame)")]


@router.post(
    "/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    summary="Classify images; each counts one query",
    responses={
        200: {"headers": {"X-Query-Count": {"description": "this client's running total of classified images",
                                            "schema": {"type": "integer"}}}},
        **error_responses(400, 413, 415, 422, 503),
    },
)
async def predict(image: Images, client: ClientDep, blackbox: BlackBoxDep, response: Response) -> PredictResponse:
    limit = blackbox.settings.max_images
    if len(image) > limit:
        raise PayloadTooLarge(f"{len(image)} files in one request, the limit is {limit}")
    files = [await read_upload(upload, blackbox.settings.max_upload_bytes) for upload in image]
    answer, running_total = await blackbox.predict(files, client)
    response.headers["X-Query-Count"] = str(running_total)
    return answer


@router.get("/healthz", response_model=Health, response_model_exclude_none=True,
            responses={503: {"model": Health, "description": "the model is not loaded yet"}})
def healthz(request: Request) -> Health | JSONResponse:
    blackbox = getattr(request.app.state, "blackbox", None)
    if blackbox is None:
        return JSONResponse(Health(status="loading").model_dump(exclude_none=True), status_code=503)
    return Health(status="ready", classes=list(blackbox.classes), output=blackbox.settings.output,
                  image_size=blackbox.classifier.image_size, max_images=blackbox.settings.max_images)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)
