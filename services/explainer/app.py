"""The explainer app factory, `create_app(settings)`: surrogates, white box and box client load in the lifespan."""

from __future__ import annotations

import json
import logging
import os
from contextlib import asynccontextmanager

import anyio
import httpx
import torch
from fastapi import FastAPI

from advexplain.services.common.errors import install_error_handlers
from advexplain.services.common.limits import BodyLimitMiddleware, HeaderLimitMiddleware
from advexplain.services.common.metrics import LatencyMiddleware, ServiceMetrics
from advexplain.services.explainer.auth import TokenGuardMiddleware
from advexplain.services.explainer.page import page_router
from advexplain.services.explainer.routes import router, whitebox_router
from advexplain.services.explainer.service import Explainer, build_http_client, close_surrogate, load_surrogate
from advexplain.services.explainer.settings import ExplainerSettings
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.errors import CheckpointError
from advexplain.shared.remote import connect_black_box

log = logging.getLogger(__name__)


def create_app(settings: ExplainerSettings, *, blackbox_client: httpx.Client | None = None) -> FastAPI:
    """`blackbox_client` replaces the pooled httpx.Client built from the settings (tests pass a
    TestClient of the black-box app, or a client with a mock transport); the caller owns it."""
    metrics = ServiceMetrics("explainer")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Per explanation: with max_concurrency explanations in each of `workers` processes, this many
        # threads each keeps the usable cores busy without oversubscribing them.
        torch.set_num_threads(settings.threads)
        surrogate = await anyio.to_thread.run_sync(load_surrogate, settings)
        whitebox = None
        if settings.whitebox_enabled:
            whitebox = await anyio.to_thread.run_sync(
                # The white box is its own oracle and must answer exactly as the served model: not folded,
                # and its answers come from the input the black box service would feed the network.
                lambda: LocalClassifier.from_checkpoint(settings.whitebox_model, device=str(settings.torch_device),
                                                        served_inputs=True).freeze(fold=False))
        http = blackbox_client if blackbox_client is not None else build_http_client(settings)
        classes = tuple(settings.classes or surrogate.classes)
        if len(classes) != len(surrogate.classes):
            raise CheckpointError(f"the classes setting names {len(classes)} classes, the surrogate has "
                                  f"{len(surrogate.classes)}")
        if whitebox is not None and len(whitebox.classes) != len(classes):
            raise CheckpointError(
                f"the white-box model has {len(whitebox.classes)} classes, the surrogate {len(classes)}"
            )
        # /predict or the Open Inference Protocol, as the URL says; the pooled client's timeouts and retries apply.
        blackbox = connect_black_box(settings.blackbox_url, classes, client=http, client_id=settings.client_id,
                                     pixel_scale=settings.oip_pixel_scale, mean=settings.oip_mean, std=settings.oip_std)
        app.state.explainer = Explainer(settings, metrics, surrogate, blackbox, whitebox)
        log.info("explainer ready: %d surrogate(s) %s, classes %s, black box %s as %r, white-box route %s, "
                 "%d at once, %d may wait up to %g s, %d torch thread(s) each, surrogate batch %s",
                 len(settings.surrogate), ", ".join(map(str, settings.surrogate)), list(classes), settings.blackbox_url,
                 settings.client_id, "on" if whitebox is not None else "off", settings.max_concurrency,
                 settings.max_queue, settings.max_queue_wait, settings.threads,
                 settings.surrogate_batch or "off")
        try:
            yield
        finally:
            app.state.explainer = None
            close_surrogate(surrogate)
            metrics.close()
            if blackbox_client is None:
                http.close()

    app = FastAPI(
        title="advexplain explainer",
        description="Explains why the black box misclassifies an image: the inverted adversarial example, found "
                    "with a surrogate's gradients and the black box's predictions, and its saliency map.",
        version="1",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.explainer = None
    install_error_handlers(app, on_error=metrics.record_error)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    if settings.whitebox_enabled:
        # The token is checked from the headers before anything reads the body (see TokenGuardMiddleware).
        app.add_middleware(TokenGuardMiddleware, token=settings.whitebox_token, on_error=metrics.record_error)
    app.add_middleware(HeaderLimitMiddleware, on_error=metrics.record_error)
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    app.include_router(router, form_limits={"max_files": 1})
    # The page for people (GET / and its assets). Its strict CSP is on its own responses only: /docs
    # loads Swagger UI from a CDN and would break under it.
    app.include_router(page_router)
    # Without a token and a model the white-box route does not exist: 404, and not in the schema.
    if settings.whitebox_enabled:
        app.include_router(whitebox_router, form_limits={"max_files": 1})
    return app


# `serve explainer --workers N`: uvicorn starts N processes that each build the app from an import
# string, so the validated settings travel to them as JSON in the environment. The white-box token is
# left out: it only ever comes from EXPLAINER_WHITEBOX_TOKEN, which the workers inherit.
SETTINGS_ENV = "ADVEXPLAIN_EXPLAINER_SETTINGS"


def settings_to_environment(settings: ExplainerSettings) -> str:
    return settings.model_dump_json(exclude={"whitebox_token"})


def create_app_from_environment() -> FastAPI:
    """The app factory each worker process runs (`uvicorn ...:create_app_from_environment --factory`)."""
    return create_app(ExplainerSettings(**json.loads(os.environ[SETTINGS_ENV])))
