"""The black-box app factory: `create_app(settings)`; the model loads in the lifespan."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import anyio
import torch
from fastapi import FastAPI

from advexplain.services.blackbox.routes import router
from advexplain.services.blackbox.service import BlackBox
from advexplain.services.blackbox.settings import BlackboxSettings
from advexplain.services.common.errors import install_error_handlers
from advexplain.services.common.limits import BodyLimitMiddleware, HeaderLimitMiddleware
from advexplain.services.common.metrics import LatencyMiddleware, ServiceMetrics
from advexplain.shared.classifiers import LocalClassifier

log = logging.getLogger(__name__)


def create_app(settings: BlackboxSettings) -> FastAPI:
    metrics = ServiceMetrics("blackbox")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        device = settings.torch_device
        classifier = await anyio.to_thread.run_sync(
            lambda: LocalClassifier.from_checkpoint(settings.model, device=str(device))
        )
        app.state.blackbox = BlackBox(classifier, settings, metrics)
        log.info("black box ready: %s on %s, classes %s, output=%s", settings.model, device,
                 ", ".join(classifier.classes), settings.output)
        try:
            yield
        finally:
            app.state.blackbox = None

    app = FastAPI(
        title="advexplain black box",
        description="A trained CNN that reveals only its predictions and counts every image it classifies.",
        version="1",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.blackbox = None
    install_error_handlers(app, on_error=metrics.record_error)
    # Enforced while the body streams in: a Content-Length over the limit is refused before reading.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(HeaderLimitMiddleware, on_error=metrics.record_error)
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    # The file-count limit also stops the multipart parser early; the handler map answers it with 413.
    app.include_router(router, form_limits={"max_files": settings.max_images})
    return app
