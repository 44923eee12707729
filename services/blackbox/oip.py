"""The black box over the Open Inference Protocol v2 (REST), served by KServe's own model server.

`advexplain serve blackbox --protocol oip` runs `kserve.ModelServer` with one `kserve.Model`,
`BlackboxModel`, named `blackbox` (`--name`):

- `GET /v2/health/ready`, `GET /v2/models/<name>/ready`, `GET /v2/models/<name>` (metadata).
- `POST /v2/models/<name>/infer`: one input `images`, FP32 [N, 3, S, S] in [0, 1] at the model's
  size S (N at most `max_images`); one output, `scores` FP32 [N, K] (probabilities), or `labels`
  INT64 [N] (class indices) with `--output label`. Class names are not part of the protocol: they
  are the caller's (the surrogate's, for the explainer).
- Every classified image counts, as on `/predict`: per `X-Client-Id` (default `anonymous`), only
  after the forward pass succeeded; the client's running total comes back in `X-Query-Count`, and
  `/metrics` (KServe's, the process's default Prometheus registry) carries `blackbox_queries_total`
  and `blackbox_queries_all_total` beside KServe's own metrics.

Needs the `kserve` extra (`pip install 'advexplain[kserve]'`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import uuid
from collections.abc import Iterator

import numpy as np
import prometheus_client
import torch
from fastapi import HTTPException

from advexplain.services.blackbox.counter import parse_client_id
from advexplain.services.blackbox.service import BlackBox
from advexplain.services.blackbox.settings import BlackboxSettings
from advexplain.services.common.errors import Overloaded
from advexplain.services.common.metrics import ServiceMetrics
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.errors import InvalidInput


@contextlib.contextmanager
def argv_hidden() -> Iterator[None]:
    """Import kserve without our command line: `kserve.model_server` parses `sys.argv` when it is
    imported (argparse's parse_known_args, prefixes allowed), so `--protocol oip` is refused as one
    of its own `--protocol` values and the process exits; `--workers` and `--model` would be taken too."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


with argv_hidden():
    import kserve
    from kserve.errors import InvalidInput as KServeInvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

log = logging.getLogger(__name__)

INPUT = "images"
SCORES = "scores"
LABELS = "labels"


class BlackboxModel(kserve.Model):
    """Our checkpoint as a `kserve.Model`: `load()` loads it and sets `ready`; `predict` classifies and counts.

    The forward pass runs off the event loop under the service's admission control
    (`BlackBox.predict_tensor`), so KServe's loop keeps answering health checks while a batch is
    classified, and a request past the queue is a 503 with Retry-After.
    """

    def __init__(self, settings: BlackboxSettings):
        super().__init__(settings.name, return_response_headers=True)
        self.settings = settings
        self.metrics = ServiceMetrics("blackbox")
        self.blackbox: BlackBox | None = None

    def load(self) -> bool:
        if self.blackbox is None:
            if self.settings.threads:
                torch.set_num_threads(self.settings.threads)
            device = self.settings.torch_device
            classifier = LocalClassifier.from_checkpoint(self.settings.model, device=str(device))
            self.blackbox = BlackBox(classifier, self.settings, self.metrics)
            # KServe serves the default registry at /metrics; our query counters join it (one model per
            # process). KServe times requests itself, and our latency and error metrics are fed by
            # middleware that does not run here, so they leave rather than stay empty.
            self.metrics.registry.unregister(self.metrics.latency)
            self.metrics.registry.unregister(self.metrics.errors)
            prometheus_client.REGISTRY.register(self.metrics.registry)
            log.info("black box ready over OIP as %r: %s on %s, classes %s, output=%s", self.name, self.settings.model,
                     device, ", ".join(classifier.classes), self.settings.output)
        self.ready = True
        return self.ready

    @property
    def image_size(self) -> int:
        return self._blackbox.classifier.image_size

    @property
    def _blackbox(self) -> BlackBox:
        if self.blackbox is None:
            raise RuntimeError("the model is not loaded")
        return self.blackbox

    def get_input_types(self) -> list[dict]:
        size = self.image_size
        return [{"name": INPUT, "datatype": "FP32", "shape": [-1, 3, size, size]}]

    def get_output_types(self) -> list[dict]:
        if self.settings.output == "label":
            return [{"name": LABELS, "datatype": "INT64", "shape": [-1]}]
        return [{"name": SCORES, "datatype": "FP32", "shape": [-1, len(self._blackbox.classes)]}]

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        blackbox = self._blackbox
        try:
            client = parse_client_id((headers or {}).get("x-client-id"))
            x = self.images(payload)
        except InvalidInput as exc:
            raise KServeInvalidInput(exc.message) from exc
        try:
            probs, total = await blackbox.predict_tensor(x, client)
        except Overloaded as exc:
            # KServe has no 503 error of its own for a busy model; FastAPI's HTTPException keeps Retry-After.
            raise HTTPException(503, detail=exc.message, headers=exc.headers) from exc
        if response_headers is not None:
            response_headers["X-Query-Count"] = str(total)
        if self.settings.output == "label":
            output = InferOutput(LABELS, shape=[probs.shape[0]], datatype="INT64")
            output.set_data_from_numpy(probs.argmax(1).numpy().astype(np.int64), binary_data=False)
        else:
            output = InferOutput(SCORES, shape=list(probs.shape), datatype="FP32")
            output.set_data_from_numpy(probs.numpy().astype(np.float32), binary_data=False)
        return InferResponse(response_id=payload.id or uuid.uuid4().hex, model_name=self.name, infer_outputs=[output])

    def images(self, payload: InferRequest) -> torch.Tensor:
        """The request's one input as (N, 3, S, S) float32 in [0, 1]; InvalidInput for anything else."""
        if not isinstance(payload, InferRequest):
            raise InvalidInput("expected an Open Inference Protocol v2 request with tensor inputs")
        if len(payload.inputs) != 1 or payload.inputs[0].name != INPUT:
            raise InvalidInput(f"expected one input tensor named {INPUT!r}, got {[i.name for i in payload.inputs]}")
        tensor = payload.inputs[0]
        size, limit = self.image_size, self.settings.max_images
        shape = list(tensor.shape)
        if tensor.datatype != "FP32":
            raise InvalidInput(f"input {INPUT!r} must be FP32, got {tensor.datatype}")
        if len(shape) != 4 or shape[1:] != [3, size, size] or not 1 <= shape[0] <= limit:
            raise InvalidInput(f"input {INPUT!r} must have shape [N, 3, {size}, {size}] with 1 <= N <= {limit}, "
                               f"got {shape}")
        try:
            array = tensor.as_numpy()
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"input {INPUT!r} does not hold {np.prod(shape)} numbers: {exc}") from exc
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise InvalidInput(f"input {INPUT!r} must hold pixels in [0, 1]")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


class ModelServer(kserve.ModelServer):
    """`kserve.ModelServer` listening on `host`: its REST server always binds 0.0.0.0, which would put
    a loopback-only black box (the default, and every test) on every interface."""

    def __init__(self, host: str, **kwargs):
        super().__init__(**kwargs)
        self.host = host

    def setup_event_loop(self) -> None:
        # start() has built the REST server and not yet run it when it calls this hook.
        if self._rest_server is not None:
            self._rest_server.config.host = self.host
        super().setup_event_loop()


def configure_logging(log_level: str) -> None:
    """KServe's and uvicorn's loggers at `log_level`; per-request lines (access log, KServe's timing
    trace) only at debug, as for `--protocol predict`."""
    level = getattr(logging, log_level.upper())
    for name in ("kserve", "uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level)
    per_request = logging.DEBUG if log_level == "debug" else logging.WARNING
    for name in ("kserve.trace", "uvicorn.access"):
        logging.getLogger(name).setLevel(max(level, per_request))


def serve_oip(settings: BlackboxSettings, log_level: str = "info") -> int:
    """Load the model, then serve it until SIGINT/SIGTERM (REST only: no gRPC port is opened)."""
    model = BlackboxModel(settings)
    model.load()
    server = ModelServer(host=settings.host, http_port=settings.port, enable_grpc=False, workers=1,
                         enable_latency_logging=log_level == "debug")
    configure_logging(log_level)
    server.start([model])
    return 0
