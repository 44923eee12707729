"""RemoteClassifier: the Classifier protocol over HTTP against the black-box service, counting queries.

Wire contract (services/blackbox):
- `GET /healthz` -> {"status": "ready", "classes": [...], "output": "proba"|"label", "max_images": int, ...}.
  The class list (index order) comes from here, fetched once on first use and counting no query;
  a label-only box names only the predicted label, so the class list cannot come from /predict.
- `POST /predict`, multipart field `image` repeated -> {"predictions": [{"label", "index",
  "probabilities"?}], "queries": int} in request order, header `X-Query-Count` (this client's total).
"""

from __future__ import annotations

import io
import math
import threading

import httpx
import numpy as np
import torch
from PIL import Image

from advexplain.shared.errors import InvalidInput, UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_IMAGES = 64


def encode_png(image: torch.Tensor) -> bytes:
    """One (C, H, W) float image in [0, 1] (C = 1 or 3) -> lossless 8-bit PNG bytes (rounded to 1/255)."""
    arr = image.detach().to("cpu", torch.float32).clamp(0, 1).mul(255).round().to(torch.uint8)
    arr = np.ascontiguousarray(arr.permute(1, 2, 0).numpy())
    img = Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class RemoteClassifier:
    """A black box reached over HTTP: `predict_proba` sends the images and returns what it answers.

    Each image of the batch travels as a lossless 8-bit PNG (so inputs are quantised to 1/255, the
    same as any image file); a batch goes as one multipart request, or several of at most the box's
    `max_images`. `queries` counts images the box classified for this object; `last_query_count` is
    the box's own running total for `client_id` (its `X-Query-Count`), so the two can be compared.

    Errors: connection refused/reset -> UpstreamUnavailable (also a 503 answer), timeout ->
    UpstreamTimeout, any other non-2xx answer, junk or a wrong shape -> UpstreamBadResponse. Only
    failed connects are retried (`connect_retries`, via httpx.HTTPTransport): a POST that reached the
    box may have been counted, so it is never resent.

    `client` is injected in tests (e.g. a Starlette TestClient); without one an httpx.Client is built
    with the timeout and retries and closed by `close()`. Thread-safe: the explainer calls it from
    worker threads.

    >>> box = RemoteClassifier("http://127.0.0.1:8000")              # doctest: +SKIP
    >>> box.predict_proba(torch.rand(2, 3, 64, 64)).shape            # doctest: +SKIP
    torch.Size([2, 2])
    """

    def __init__(
        self,
        base_url: str,
        *,
        client: httpx.Client | None = None,
        client_id: str = "advexplain-explainer",
        timeout: float = DEFAULT_TIMEOUT,
        connect_retries: int = 2,
    ):
        if connect_retries < 0:
            raise ValueError("connect_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self._owns_client = client is None
        if client is None:
            client = httpx.Client(
                transport=httpx.HTTPTransport(retries=connect_retries),
                timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            )
        self._client = client
        self._lock = threading.Lock()
        self._queries = 0
        self._last_query_count: int | None = None
        self._info: dict | None = None

    # ------------------------------------------------------------ what the box says about itself

    def _describe(self) -> dict:
        with self._lock:
            if self._info is not None:
                return self._info
        body = self._json(self._request("GET", "/healthz"))
        classes = body.get("classes") if isinstance(body, dict) else None
        if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes)
                or len(set(classes)) != len(classes)):
            raise UpstreamBadResponse(f"{self.base_url}/healthz did not list the class names: {str(body)[:200]}")
        max_images = body.get("max_images", DEFAULT_MAX_IMAGES)
        if not isinstance(max_images, int) or max_images < 1:
            max_images = DEFAULT_MAX_IMAGES
        info = {"classes": tuple(classes), "max_images": max_images, "output": body.get("output")}
        with self._lock:
            self._info = info
        return info

    @property
    def classes(self) -> tuple[str, ...]:
        """The box's class names in index order (one GET /healthz on first use; no query counted)."""
        return self._describe()["classes"]

    @property
    def max_images(self) -> int:
        return self._describe()["max_images"]

    @property
    def queries(self) -> int:
        """Images this object sent that the box classified."""
        return self._queries

    @property
    def last_query_count(self) -> int | None:
        """The box's running total for `client_id` after the latest answer (X-Query-Count)."""
        return self._last_query_count

    # ------------------------------------------------------------ classification

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) float in [0, 1], C = 1 or 3 -> (N, K) float32 probabilities on the CPU.

        One-hot rows when the box is label-only. Counts N queries; x is not modified.
        """
        if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
            raise InvalidInput(f"expected a non-empty image batch (N, 1|3, H, W), got shape {tuple(x.shape)}")
        info = self._describe()
        chunk = info["max_images"]
        rows = [self._predict_chunk(x[i:i + chunk], info["classes"]) for i in range(0, x.shape[0], chunk)]
        return torch.cat(rows)

    def _predict_chunk(self, x: torch.Tensor, classes: tuple[str, ...]) -> torch.Tensor:
        files = [("image", (f"{i}.png", encode_png(img), "image/png")) for i, img in enumerate(x)]
        resp = self._request("POST", "/predict", files=files, headers={"X-Client-Id": self.client_id})
        body = self._json(resp)
        probs = self._parse_predictions(body, len(files), classes)
        with self._lock:
            self._queries += len(files)
            header = resp.headers.get("X-Query-Count")
            if header is not None and header.isdigit():
                self._last_query_count = int(header)
        return probs

    def _parse_predictions(self, body, n: int, classes: tuple[str, ...]) -> torch.Tensor:
        def bad(why: str) -> UpstreamBadResponse:
            return UpstreamBadResponse(f"{self.base_url}/predict answered {why}")

        if not isinstance(body, dict) or not isinstance(body.get("predictions"), list):
            raise bad(f"without a predictions list: {str(body)[:200]}")
        predictions = body["predictions"]
        if len(predictions) != n or body.get("queries") != n:
            raise bad(f"{len(predictions)} predictions / queries={body.get('queries')!r} for {n} images")
        out = torch.zeros((n, len(classes)), dtype=torch.float32)
        for row, pred in enumerate(predictions):
            if not isinstance(pred, dict):
                raise bad(f"a prediction that is not an object: {pred!r}")
            index, label = pred.get("index"), pred.get("label")
            if not isinstance(index, int) or not 0 <= index < len(classes) or label != classes[index]:
                raise bad(f"label {label!r} / index {index!r} that do not match the classes {classes}")
            probabilities = pred.get("probabilities")
            if probabilities is None:
                out[row, index] = 1.0
                continue
            if not isinstance(probabilities, dict) or set(probabilities) != set(classes):
                raise bad(f"probabilities for {sorted(probabilities) if isinstance(probabilities, dict) else probabilities!r}, expected {classes}")
            values = [probabilities[c] for c in classes]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1 for v in values) \
                    or abs(sum(values) - 1) > 1e-3:
                raise bad(f"probabilities that are not a distribution: {values}")
            out[row] = torch.tensor(values, dtype=torch.float32)
        return out

    # ------------------------------------------------------------ transport

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        url = f"{self.base_url}{path}"
        try:
            resp = self._client.request(method, url, **kwargs)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"the black box at {self.base_url} did not answer in time ({type(exc).__name__})") from exc
        except httpx.NetworkError as exc:
            raise UpstreamUnavailable(f"cannot reach the black box at {self.base_url}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamBadResponse(f"broken answer from the black box at {self.base_url}: {exc}") from exc
        if resp.status_code == 503:
            raise UpstreamUnavailable(f"the black box at {self.base_url} is not ready (503): {resp.text[:200]}")
        if not resp.is_success:
            raise UpstreamBadResponse(f"{url} answered {resp.status_code}: {resp.text[:200]}")
        return resp

    def _json(self, resp: httpx.Response):
        try:
            return resp.json()
        except ValueError as exc:
            raise UpstreamBadResponse(f"{resp.request.url} answered {resp.status_code} with a body that is not JSON: "
                                      f"{resp.text[:100]!r}") from exc

    def close(self) -> None:
        """Close the HTTP client if this object built it (an injected client belongs to its owner)."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> "RemoteClassifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

