"""OipClassifier: the Classifier protocol over the Open Inference Protocol v2 (REST, JSON tensors).

Any server that speaks OIP v2 REST can be the black box: KServe (and `advexplain serve blackbox
--protocol oip`), NVIDIA Triton, Seldon MLServer, TorchServe in its KServe mode, OpenVINO Model
Server. A black-box URL of the form `http(s)://host:port/v2/models/<name>[/versions/<v>]` selects it
(`is_oip_url`).

Wire contract (the parts used here):
- `GET /v2/health/ready`, `GET /v2/models/<name>/ready`: readiness (`OipClassifier.health`, with the
  states of `advexplain.shared.remote`).
- `GET /v2/models/<name>` -> {"inputs": [{"name", "datatype", "shape"}], ...}: the one input tensor,
  fetched once. Datatype FP32 or UINT8; shape [B, C, H, W] (NCHW) or [B, H, W, C] (NHWC) with C = 1
  or 3 (the layout is read from where the C sits) and B = -1 (any batch) or a fixed number; a shape
  of three dimensions is one image per request without a batch dimension. H or W of -1 means the
  model takes any size: images are then sent at their own.
- `POST /v2/models/<name>/infer` {"inputs": [{"name", "shape", "datatype", "data": [...]}]} ->
  {"outputs": [{"name", "datatype", "shape", "data"}, ...]}: the first output is read as scores
  [N, K] (probabilities, other non-negative scores, or logits) or as class indices [N] (or [N, 1])
  for a label-only model.

The class names are the caller's (the surrogate's): OIP has no class list, so index k of the
model's output is `classes[k]`, and an output with another number of classes is a bad answer.

This module speaks the protocol with httpx and a few pydantic models rather than the `kserve`
package's InferRequest/InferResponse: importing any part of `kserve` parses the host process's
`sys.argv` (kserve.model_server does at import) and takes seconds, which a library used by the
explainer, `train` and `evaluate` must not do, and the explainer then works without the `kserve`
extra. The tests check this encoding against kserve's own types and a real `kserve.ModelServer`.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import httpx
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from advexplain.shared.errors import UpstreamBadResponse
from advexplain.shared.remote import NOT_READY, READY, UNREACHABLE, HttpBlackBox
from advexplain.shared.wire import CLIENT_ID_HEADER

DEFAULT_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 5.0
# Images per infer request when the model's batch dimension is variable: OIP has no field for the
# server's own limit (advexplain's OIP black box takes 64, Triton its max_batch_size).
DEFAULT_MAX_IMAGES = 32

_NAME = r"[^/?#\s]+"
OIP_URL = re.compile(
    rf"^(?P<base>https?://[^/?#\s]+(?:/[^?#\s]*?)?)/v2/models/(?P<model>{_NAME})(?:/versions/(?P<version>{_NAME}))?/?$"
)
# ITU-R 601-2 luma, what Pillow's convert("L") uses: for a model that takes one channel.
LUMA = (0.299, 0.587, 0.114)
INTEGER_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
FLOAT_TYPES = {"FP16", "FP32", "FP64"}


def is_oip_url(url: str) -> bool:
    """True when `url` names a model over the Open Inference Protocol: `http(s)://host:port/v2/models/<name>`
    (optionally `/versions/<v>`, and optionally behind a path prefix before `/v2`)."""
    return isinstance(url, str) and OIP_URL.match(url.strip()) is not None


@dataclass(frozen=True)
class OipEndpoint:
    """Where a model lives: the server's base URL (with any path prefix), the model's name and version."""

    base: str
    model: str
    version: str | None = None

    @classmethod
    def parse(cls, url: str) -> OipEndpoint:
        match = OIP_URL.match(url.strip()) if isinstance(url, str) else None
        if match is None:
            raise ValueError(f"{url!r} is not an Open Inference Protocol model URL: "
                             "expected http(s)://host:port/v2/models/<name>[/versions/<version>]")
        return cls(match["base"].rstrip("/"), match["model"], match["version"])

    @property
    def model_url(self) -> str:
        url = f"{self.base}/v2/models/{self.model}"
        return f"{url}/versions/{self.version}" if self.version else url

    @property
    def server_ready_url(self) -> str:
        return f"{self.base}/v2/health/ready"

    def __str__(self) -> str:
        return self.model_url


@dataclass(frozen=True)
class OipInput:
    """The model's input tensor as its metadata describes it.

    `height`/`width` are None when the model takes any size; `batch` is None for a variable batch
    dimension (-1), else the fixed number of images per request; `batched` is False for a shape
    without a batch dimension (one image per request).
    """

    name: str
    datatype: Literal["FP32", "UINT8"]
    layout: Literal["NCHW", "NHWC"]
    channels: int
    height: int | None
    width: int | None
    batch: int | None = None
    batched: bool = True

    @classmethod
    def from_metadata(cls, tensor: TensorMetadata) -> OipInput:
        given = tensor.datatype.upper()
        if given not in ("FP32", "UINT8"):
            raise ValueError(f"input {tensor.name!r} is {given}; only FP32 and UINT8 images are supported")
        datatype = cast(Literal["FP32", "UINT8"], given)
        shape = list(tensor.shape)
        batched = len(shape) == 4
        if len(shape) not in (3, 4):
            raise ValueError(
                f"input {tensor.name!r} has shape {shape}: an image batch needs [B, C, H, W] or [B, H, W, C]"
            )
        batch = shape[0] if batched else 1
        dims = shape[1:] if batched else shape
        # The channel dimension is the one of size 1 or 3; when both ends could be (a 3-pixel-wide
        # image), NCHW, the usual layout for images in OIP servers, wins.
        layout: Literal["NCHW", "NHWC"]
        if dims[0] in (1, 3):
            layout, channels, height, width = "NCHW", dims[0], dims[1], dims[2]
        elif dims[2] in (1, 3):
            layout, channels, height, width = "NHWC", dims[2], dims[0], dims[1]
        else:
            raise ValueError(f"input {tensor.name!r} has shape {shape}: no channel dimension of 1 or 3 "
                             "first (NCHW) or last (NHWC)")
        for what, value in (("batch", batch), ("height", height), ("width", width)):
            if value == 0 or value < -1:
                raise ValueError(f"input {tensor.name!r} has shape {shape}: {what} {value} is not a size")
        return cls(
            name=tensor.name, datatype=datatype, layout=layout, channels=channels,
            height=None if height == -1 else height, width=None if width == -1 else width,
            batch=None if batch == -1 else batch, batched=batched,
        )

    def shape_for(self, n: int, height: int, width: int) -> list[int]:
        dims = [self.channels, height, width] if self.layout == "NCHW" else [height, width, self.channels]
        return [n, *dims] if self.batched else dims


# -- the protocol's messages (the fields this client reads; servers may send more) ---------------

class TensorMetadata(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    inputs: list[TensorMetadata] = Field(min_length=1)
    outputs: list[TensorMetadata] = Field(default_factory=list)


class OutputTensor(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


class InferenceResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    outputs: list[OutputTensor] = Field(min_length=1)


class OipClassifier(HttpBlackBox):
    """A black box reached over the Open Inference Protocol v2: `predict_proba` sends JSON tensors.

    Each image is rounded to 8 bits first (the box sees what an image file would hold), then
    resized on the query path to the model's input size (bilinear, antialiased, aspect ratio not
    kept; for a UINT8 input rounded again after resizing) and laid out as the model's metadata says
    (NCHW or NHWC, FP32 or UINT8, 1 or 3 channels). FP32 pixels go as `x * pixel_scale` (1: [0, 1],
    the default; 255: [0, 255]), then `(p - mean) / std` per channel when `mean`/`std` are given,
    in the same units. The first output tensor is read as scores [N, K] (normalised to
    probabilities: divided by their sum when all are in [0, 1], else softmaxed as logits) or as class
    indices [N] (one-hot rows, a label-only box).

    `classes` are the caller's (the surrogate's): OIP carries no class names. `queries` counts the
    images the server classified for this object; `last_query_count` is the server's own running
    total for `client_id` when it sends `X-Query-Count` (advexplain's OIP black box does).

    Errors: no connection -> UpstreamUnavailable (also a 503 answer), timeout -> UpstreamTimeout,
    any other non-2xx answer, junk, a wrong shape or datatype -> UpstreamBadResponse. Only failed
    connects are retried (`connect_retries`, on the transport): an infer request that reached the
    server may have been counted, so it is never resent. `client` is injected in tests and by the
    services (its own timeouts and retries then apply); without one an httpx.Client is built and
    closed by `close()`. Thread-safe.

    >>> box = OipClassifier("http://127.0.0.1:8080/v2/models/blackbox", ("defective", "functional"))  # doctest: +SKIP
    >>> box.health()                                                                                # doctest: +SKIP
    ('ok', 'ready')
    >>> box.predict_proba(torch.rand(2, 3, 105, 80)).shape                                          # doctest: +SKIP
    torch.Size([2, 2])
    """

    kind = "an OIP classifier"

    def __init__(
        self,
        url: str,
        classes: Sequence[str],
        *,
        client: httpx.Client | None = None,
        client_id: str | None = "advexplain-explainer",
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        connect_retries: int = 2,
        max_images: int = DEFAULT_MAX_IMAGES,
        pixel_scale: float = 1.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.endpoint = OipEndpoint.parse(url)
        if max_images < 1:
            raise ValueError("max_images must be >= 1")
        if pixel_scale not in (1.0, 255.0):
            raise ValueError(f"pixel_scale must be 1 ([0, 1] pixels) or 255 ([0, 255] pixels), got {pixel_scale}")
        if (mean is None) != (std is None):
            raise ValueError("give mean and std together, or neither")
        if mean is not None:
            if std is None:  # checked above: both or neither
                raise ValueError("give mean and std together, or neither")
            mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
            if len(mean) not in (1, 3) or len(std) != len(mean):
                raise ValueError(f"mean and std need 1 or 3 values each, got {len(mean)} and {len(std)}")
            if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
                raise ValueError("mean must be finite and std finite and > 0")
        super().__init__(self.endpoint.model_url, classes, client=client, client_id=client_id, timeout=timeout,
                         connect_timeout=connect_timeout, connect_retries=connect_retries)
        self.max_images = max_images
        self.pixel_scale = float(pixel_scale)
        self.mean, self.std = mean, std
        self._input: OipInput | None = None

    @property
    def url(self) -> str:
        return self.endpoint.model_url

    # ------------------------------------------------------------ what the server says about itself

    def health(self, timeout: float | None = None) -> tuple[str, str]:
        """(state, detail) from `GET /v2/health/ready` and `GET /v2/models/<name>/ready`; never raises, counts nothing.

        state (as `RemoteClassifier.health`): READY (both answer 200 and neither says not ready),
        NOT_READY (another status, e.g. 503 while loading or 404 for a model the server does not
        have, or {"ready": false}), UNREACHABLE (no connection or no answer in time). The protocol
        requires both endpoints, so there is no NO_HEALTH_ENDPOINT here.
        """
        for url in (self.endpoint.server_ready_url, f"{self.endpoint.model_url}/ready"):
            try:
                resp = self._client.get(url, timeout=timeout) if timeout else self._client.get(url)
            except httpx.TimeoutException:
                return UNREACHABLE, f"no answer from {url} in time"
            except httpx.HTTPError as exc:
                return UNREACHABLE, f"cannot reach {url}: {type(exc).__name__}"
            if resp.status_code != 200:
                return NOT_READY, f"{url} answered {resp.status_code}"
            try:
                body = resp.json()
            except ValueError:
                body = None
            # Both readiness answers carry {"ready": bool} in the protocol; a bare 200 is taken as ready.
            if isinstance(body, dict) and body.get("ready") is False:
                return NOT_READY, f"{url} says not ready"
        return READY, "ready"

    def ready(self, timeout: float | None = None) -> tuple[bool, str]:
        """(ok, detail): `health()` as a yes or no."""
        state, detail = self.health(timeout)
        return state == READY, detail

    @property
    def input(self) -> OipInput:
        """The model's input tensor (one `GET /v2/models/<name>` on first use; no query counted)."""
        with self._lock:
            if self._input is not None:
                return self._input
        resp = self._send("GET", self.endpoint.model_url)
        try:
            metadata = ModelMetadata.model_validate(self._json(resp))
        except ValidationError as exc:
            raise UpstreamBadResponse(
                f"{self.url} answered metadata without an input tensor: {_first_error(exc)}"
            ) from exc
        if len(metadata.inputs) != 1:
            raise UpstreamBadResponse(f"{self.url} takes {len(metadata.inputs)} input tensors; an image classifier "
                                      "with one input is needed")
        try:
            spec = OipInput.from_metadata(metadata.inputs[0])
        except ValueError as exc:
            raise UpstreamBadResponse(f"{self.url}: {exc}") from exc
        if spec.datatype == "UINT8" and (self.pixel_scale != 1.0 or self.mean is not None):
            raise UpstreamBadResponse(f"{self.url} takes UINT8 pixels; pixel_scale, mean and std apply to FP32 "
                                      "inputs only")
        if self.mean is not None and len(self.mean) not in (1, spec.channels):
            raise UpstreamBadResponse(
                f"{self.url} takes {spec.channels} channel(s); mean and std have {len(self.mean)}"
            )
        with self._lock:
            self._input = spec
        return spec

    # ------------------------------------------------------------ classification

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) float in [0, 1] at any size, C = 1 or 3 -> (N, K) float32 probabilities on the CPU.

        One-hot rows when the model answers class indices. Counts N queries; x is not modified.
        """
        self._check_batch(x)
        spec = self.input
        chunk = spec.batch if spec.batch is not None else self.max_images
        rows = [self._infer(self._pixels(x[i:i + chunk], spec), spec) for i in range(0, x.shape[0], chunk)]
        return torch.cat(rows)

    def pixels(self, x: torch.Tensor) -> np.ndarray:
        """The array `predict_proba` sends for x (N, C, H, W) in [0, 1]: 8-bit rounded, resized, laid out,
        scaled and normalised as the model's input says. For tests and benchmarks."""
        return self._pixels(x, self.input)

    def _pixels(self, x: torch.Tensor, spec: OipInput) -> np.ndarray:
        with torch.no_grad():
            x = x.detach().to("cpu", torch.float32)
            # The box sees an 8-bit image, as it would from any file; rounding also makes a copy.
            x = x.clamp(0, 1).mul(255).round()
            if spec.channels == 1 and x.shape[1] == 3:
                x = (x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True).round()
            elif spec.channels == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            size = (spec.height or x.shape[2], spec.width or x.shape[3])
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 255)
                if spec.datatype == "UINT8":
                    x = x.round()
            if spec.layout == "NHWC":
                x = x.permute(0, 2, 3, 1)
            if spec.datatype == "UINT8":
                return np.ascontiguousarray(x.to(torch.uint8).numpy())
            x = x.div(255.0) if self.pixel_scale == 1.0 else x
            if self.mean is not None:
                shape = (1, -1, 1, 1) if spec.layout == "NCHW" else (1, 1, 1, -1)
                x = (x - torch.tensor(self.mean).view(shape)) / torch.tensor(self.std).view(shape)
            return np.ascontiguousarray(x.numpy().astype(np.float32, copy=False))

    def _infer(self, pixels: np.ndarray, spec: OipInput) -> torch.Tensor:
        n = pixels.shape[0]
        height, width = (pixels.shape[1:3] if spec.layout == "NHWC" else pixels.shape[2:4])
        tensor = {"name": spec.name, "shape": spec.shape_for(n, int(height), int(width)), "datatype": spec.datatype,
                  "data": pixels.ravel().tolist()}
        headers = {CLIENT_ID_HEADER: self.client_id} if self.client_id else None
        resp = self._send("POST", f"{self.endpoint.model_url}/infer",
                             json={"id": uuid.uuid4().hex, "inputs": [tensor]}, headers=headers)
        probs = self._parse_output(self._json(resp), n, spec.batched)
        self._counted(resp, n)
        return probs

    def _parse_output(self, body: Any, n: int, batched: bool = True) -> torch.Tensor:
        def bad(why: str) -> UpstreamBadResponse:
            return UpstreamBadResponse(f"{self.url}/infer answered {why}")

        try:
            output = InferenceResponse.model_validate(body).outputs[0]
        except ValidationError as exc:
            raise bad(f"without an output tensor: {_first_error(exc)}") from exc
        datatype, shape, k = output.datatype.upper(), output.shape, len(self.classes)
        if datatype not in INTEGER_TYPES | FLOAT_TYPES:
            raise bad(f"a {datatype} output; scores or class indices are numbers")
        try:
            values = np.asarray(output.data, dtype=np.float64).ravel()
        except (TypeError, ValueError) as exc:
            raise bad(f"output data that are not numbers: {str(output.data)[:100]}") from exc
        if any(d < 0 for d in shape) or values.size != math.prod(shape):
            raise bad(f"output shape {shape} with {values.size} values")
        if not np.isfinite(values).all():
            raise bad("scores that are not finite")
        if not batched and shape in ([k], [], [1]):
            shape = [1, k] if shape == [k] else [1]  # one image without a batch dimension
        if shape in ([n], [n, 1]):
            # Class indices: a label-only model.
            if not np.array_equal(values, np.round(values)) or values.min() < 0 or values.max() >= k:
                raise bad(f"class indices outside 0..{k - 1}: {values[:10].tolist()}")
            return F.one_hot(torch.from_numpy(values.astype(np.int64)), k).float()
        if shape != [n, k]:
            raise bad(f"an output of shape {shape}; expected [{n}, {k}] scores or [{n}] class indices "
                      f"for {n} images and the classes {self.classes}")
        scores = torch.from_numpy(values.reshape(n, k))
        sums = scores.sum(1, keepdim=True)
        if scores.min() >= 0 and scores.max() <= 1 and (sums > 0).all():
            return (scores / sums).float()
        # Logits (a row of zeros included): the same argmax either way, and a distribution.
        return torch.softmax(scores, dim=1).float()

    # ------------------------------------------------------------ transport

    def _json(self, resp: httpx.Response) -> Any:
        try:
            return resp.json()
        except ValueError as exc:
            raise UpstreamBadResponse(f"{resp.request.url} answered {resp.status_code} with a body that is not JSON: "
                                      f"{resp.text[:100]!r}") from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err.get('loc', ())) or 'body'}: {err.get('msg', 'invalid')}"
