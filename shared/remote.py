"""RemoteClassifier: the Classifier protocol over HTTP against any box that answers `POST /predict`.

Nothing but `POST /predict` in the shape of `advexplain.shared.wire` is required of the box. The
class names are the caller's (the surrogate's checkpoint, or a setting) and every label the box
answers is matched against them by name: a label outside them is a bad answer (502 in the
services), never guessed at. `GET /healthz` is optional: when the box has one, it is used for
readiness and for `max_images` (files per request); without one, images go one per request.

`connect_black_box(url, classes)` is the one way the explainer, `train --distill-from` and
`evaluate --blackbox-url` reach a black box: an Open Inference Protocol model URL
(`http(s)://host:port/v2/models/<name>[/versions/<v>]`) gives an `OipClassifier`, any other URL a
`RemoteClassifier`. Both answer `health()` with the same states (READY, NO_HEALTH_ENDPOINT,
NOT_READY, UNREACHABLE) and map failures to the same typed errors.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

import httpx
import torch
from pydantic import ValidationError

from advexplain.shared.errors import InvalidInput, UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from advexplain.shared.pixels import encode_png
from advexplain.shared.wire import CLIENT_ID_HEADER, PredictResponse

if TYPE_CHECKING:
    from advexplain.shared.oip import OipClassifier

DEFAULT_TIMEOUT = 30.0
# Files per request when the box does not say (no /healthz, or one without max_images): one, the
# only number any /predict is sure to take.
UNKNOWN_MAX_IMAGES = 1

# Readiness states (`health()` of RemoteClassifier and OipClassifier).
READY, NO_HEALTH_ENDPOINT, NOT_READY, UNREACHABLE = "ok", "no_health_endpoint", "not_ready", "unreachable"


@runtime_checkable
class RemoteBlackBox(Protocol):
    """What a black box over HTTP offers besides the Classifier protocol: readiness, its query count, close()."""

    classes: tuple[str, ...]

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor: ...

    def health(self, timeout: float | None = None) -> tuple[str, str]: ...

    @property
    def queries(self) -> int: ...

    def close(self) -> None: ...


def connect_black_box(
    url: str,
    classes: Sequence[str],
    *,
    client: httpx.Client | None = None,
    client_id: str = "advexplain-explainer",
    timeout: float = DEFAULT_TIMEOUT,
    connect_retries: int = 2,
    max_images: int | None = None,
    pixel_scale: float = 1.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> RemoteClassifier | OipClassifier:
    """The black box at `url`: an OipClassifier for an OIP model URL, else a RemoteClassifier (POST /predict).

    `classes` are the caller's (the surrogate's, or the local data's): neither protocol is trusted
    to name them. `client`, `client_id`, `timeout`, `connect_retries` and `max_images` mean the
    same for both (an injected client brings its own timeouts and retries); `pixel_scale`, `mean`
    and `std` say how an OIP model wants FP32 pixels and are refused for a /predict URL, which
    takes image files.

    >>> connect_black_box("http://127.0.0.1:8080/v2/models/blackbox", ("defective", "functional"))  # doctest: +SKIP
    <advexplain.shared.oip.OipClassifier object at ...>
    """
    # Imported here: shared.oip takes the readiness states from this module.
    from advexplain.shared.oip import DEFAULT_MAX_IMAGES, OipClassifier, is_oip_url

    if is_oip_url(url):
        return OipClassifier(url, classes, client=client, client_id=client_id, timeout=timeout,
                             connect_retries=connect_retries, max_images=max_images or DEFAULT_MAX_IMAGES,
                             pixel_scale=pixel_scale, mean=mean, std=std)
    if pixel_scale != 1.0 or mean is not None or std is not None:
        raise InvalidInput(f"pixel scale, mean and std apply to Open Inference Protocol model URLs "
                           f"(http(s)://host:port/v2/models/<name>) only; {url} takes image files over /predict")
    return RemoteClassifier(url, classes, client=client, client_id=client_id, timeout=timeout,
                            connect_retries=connect_retries, max_images=max_images)


class HttpBlackBox:
    """What every black box over HTTP shares (`RemoteClassifier`: POST /predict; `OipClassifier`: the
    Open Inference Protocol): the class names, a pooled or own httpx client, the count of images it
    classified (`queries`) and its own running total (`last_query_count`, from X-Query-Count), one
    map from transport failures to typed errors, and `close()`. Thread-safe.

    Errors (`_send`): connection refused/reset -> UpstreamUnavailable (also a 503 answer), timeout ->
    UpstreamTimeout, any other non-2xx answer or a broken one -> UpstreamBadResponse. Only failed
    connects are retried (`connect_retries`, on the transport): a request that reached the box may
    have been counted, so it is never resent.
    """

    kind = "a remote classifier"

    def __init__(self, where: str, classes: Sequence[str], *, client: httpx.Client | None, client_id: str | None,
                 timeout: float, connect_timeout: float, connect_retries: int) -> None:
        classes = tuple(classes)
        if len(classes) < 2 or len(set(classes)) != len(classes) or not all(isinstance(c, str) and c for c in classes):
            raise InvalidInput(f"{self.kind} needs at least two distinct class names, got {classes!r}")
        if connect_retries < 0:
            raise ValueError("connect_retries must be >= 0")
        if not (timeout > 0 and connect_timeout > 0):
            raise ValueError("timeouts must be > 0")
        self.where = where  # how errors name the box
        self.classes = classes
        self.client_id = client_id
        self._owns_client = client is None
        if client is None:
            client = httpx.Client(
                transport=httpx.HTTPTransport(retries=connect_retries),
                timeout=httpx.Timeout(timeout, connect=min(connect_timeout, timeout)),
            )
        self._client = client
        self._lock = threading.Lock()
        self._queries = 0
        self._last_query_count: int | None = None

    @property
    def queries(self) -> int:
        """Images this object sent that the box classified."""
        return self._queries

    @property
    def last_query_count(self) -> int | None:
        """The box's running total for `client_id` after the latest answer (X-Query-Count), if it sends one."""
        return self._last_query_count

    @staticmethod
    def _check_batch(x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
            raise InvalidInput(f"expected a non-empty image batch (N, 1|3, H, W), got shape {tuple(x.shape)}")

    def _counted(self, resp: httpx.Response, images: int) -> None:
        """After a valid answer: `images` more queries, and the box's own total when it says it."""
        with self._lock:
            self._queries += images
            header = resp.headers.get("X-Query-Count")
            if header is not None and header.isdigit():
                self._last_query_count = int(header)

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        box = f"the black box at {self.where}"
        try:
            resp = self._client.request(method, url, **kwargs)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{box} did not answer in time ({type(exc).__name__})") from exc
        except httpx.NetworkError as exc:
            raise UpstreamUnavailable(f"cannot reach {box}: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamBadResponse(f"broken answer from {box}: {type(exc).__name__}") from exc
        if resp.status_code == 503:
            raise UpstreamUnavailable(f"{box} is not ready (503): {error_text(resp)}")
        if not resp.is_success:
            raise UpstreamBadResponse(f"{url} answered {resp.status_code}: {error_text(resp)}")
        return resp

    def close(self) -> None:
        """Close the HTTP client if this object built it (an injected client belongs to its owner)."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def error_text(resp: httpx.Response) -> str:
    """The box's own error message, shortened (ours: {"error": {"message"}}; OIP: {"error": "..."}); never headers."""
    try:
        body = resp.json()
    except ValueError:
        return repr(resp.text[:200])
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(message := error.get("message"), str):
        return message[:200]
    if isinstance(error, str):
        return error[:200]
    return str(body)[:200]


class RemoteClassifier(HttpBlackBox):
    """A black box reached over HTTP: `predict_proba` sends images and returns what it answers.

    Each image travels as a lossless 8-bit PNG at its own size (so inputs are quantised to 1/255,
    the same as any image file; the box resizes as it likes); `predict_files` sends encoded files
    as they are (the user's upload, for its first prediction). A batch goes as one multipart
    request, or several of at most `max_images`. `queries` counts images the box classified for
    this object; `last_query_count` is the box's own running total for `client_id` when it sends
    `X-Query-Count`.

    Errors: connection refused/reset -> UpstreamUnavailable (also a 503 answer), timeout ->
    UpstreamTimeout, any other non-2xx answer, junk, a wrong count or a label outside `classes`
    -> UpstreamBadResponse. Only failed connects are retried (`connect_retries`, on the transport):
    a POST that reached the box may have been counted, so it is never resent.

    `client` is injected in tests and by the services (a pooled client); without one an
    httpx.Client is built with the timeout and retries and closed by `close()`. Thread-safe.

    >>> box = RemoteClassifier("http://127.0.0.1:8000", classes=("female", "male"))   # doctest: +SKIP
    >>> box.predict_proba(torch.rand(2, 3, 105, 80)).shape                          # doctest: +SKIP
    torch.Size([2, 2])
    """

    def __init__(
        self,
        base_url: str,
        classes: Sequence[str],
        *,
        client: httpx.Client | None = None,
        client_id: str = "advexplain-explainer",
        timeout: float = DEFAULT_TIMEOUT,
        connect_retries: int = 2,
        max_images: int | None = None,
    ) -> None:
        if max_images is not None and max_images < 1:
            raise ValueError("max_images must be >= 1")
        self.base_url = base_url.rstrip("/")
        super().__init__(self.base_url, classes, client=client, client_id=client_id, timeout=timeout,
                         connect_timeout=5.0, connect_retries=connect_retries)
        self._max_images = max_images

    # ------------------------------------------------------------ what the box says about itself

    def health(self, timeout: float | None = None) -> tuple[str, str]:
        """(state, detail) from the box's optional GET /healthz; counts no query.

        state: READY (200), NO_HEALTH_ENDPOINT (the box answers, but has no /healthz: 404/405),
        NOT_READY (503 or another status), UNREACHABLE (no connection or no answer in time).
        """
        url = f"{self.base_url}/healthz"
        try:
            resp = self._client.get(url, timeout=timeout) if timeout else self._client.get(url)
        except httpx.TimeoutException:
            return UNREACHABLE, f"no answer from {url} within {timeout}s"
        except httpx.HTTPError as exc:
            return UNREACHABLE, f"cannot reach {url}: {type(exc).__name__}"
        if resp.status_code == 200:
            return READY, "ready"
        if resp.status_code in (404, 405):
            return NO_HEALTH_ENDPOINT, f"{url} answered {resp.status_code}: the box has no health endpoint"
        return NOT_READY, f"{url} answered {resp.status_code}"

    @property
    def max_images(self) -> int:
        """Files per /predict request: the constructor's, else the box's /healthz `max_images`, else 1."""
        with self._lock:
            if self._max_images is not None:
                return self._max_images
        found = UNKNOWN_MAX_IMAGES
        try:
            resp = self._client.get(f"{self.base_url}/healthz")
            body = resp.json() if resp.status_code == 200 else None
            if isinstance(body, dict) and isinstance(body.get("max_images"), int) and body["max_images"] >= 1:
                found = body["max_images"]
        except (httpx.HTTPError, ValueError):
            pass
        with self._lock:
            self._max_images = found
        return found

    # ------------------------------------------------------------ classification

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) float in [0, 1], C = 1 or 3, any H and W -> (N, K) float32 probabilities.

        One-hot rows when the box answers labels only. Counts N queries; x is not modified.
        """
        self._check_batch(x)
        return self.predict_files([encode_png(image) for image in x])

    def predict_files(self, files: Sequence[bytes]) -> torch.Tensor:
        """Encoded images, sent as they are -> (N, K) float32 probabilities. Counts N queries."""
        if not files:
            raise InvalidInput("no images to classify")
        chunk = self.max_images
        return torch.cat([self._predict_chunk(files[i:i + chunk]) for i in range(0, len(files), chunk)])

    def _predict_chunk(self, files: Sequence[bytes]) -> torch.Tensor:
        parts = [("image", (f"{i}{_extension(data)}", data, _media_type(data))) for i, data in enumerate(files)]
        headers = {CLIENT_ID_HEADER: self.client_id} if self.client_id else None
        resp = self._send("POST", f"{self.base_url}/predict", files=parts, headers=headers)
        probs = self._parse(resp, len(files))
        self._counted(resp, len(files))
        return probs

    def _parse(self, resp: httpx.Response, n: int) -> torch.Tensor:
        def bad(why: str) -> UpstreamBadResponse:
            return UpstreamBadResponse(f"{self.base_url}/predict answered {why}")

        try:
            answer = PredictResponse.model_validate_json(resp.content)
        except ValidationError as exc:
            raise bad(f"something that is not a prediction answer ({exc.error_count()} problem(s)): "
                      f"{resp.text[:200]!r}") from None
        if len(answer.predictions) != n or (answer.queries is not None and answer.queries != n):
            raise bad(f"{len(answer.predictions)} predictions / queries={answer.queries!r} for {n} images")
        out = torch.zeros((n, len(self.classes)), dtype=torch.float32)
        for row, prediction in enumerate(answer.predictions):
            if prediction.label not in self.classes:
                raise bad(f"the label {prediction.label!r}, which is not one of the classes {list(self.classes)}: "
                          "the explainer and the box disagree on what the classes are")
            if prediction.probabilities is None:
                out[row, self.classes.index(prediction.label)] = 1.0
                continue
            probabilities = prediction.probabilities
            if set(probabilities) != set(self.classes):
                raise bad(f"probabilities for {sorted(probabilities)}, expected {list(self.classes)}")
            values = [probabilities[c] for c in self.classes]
            if not all(math.isfinite(v) and 0 <= v <= 1 for v in values) or abs(sum(values) - 1) > 1e-3:
                raise bad(f"probabilities that are not a distribution: {values}")
            if max(values) > values[self.classes.index(prediction.label)] + 1e-6:
                raise bad(f"the label {prediction.label!r} that is not its most probable class")
            out[row] = torch.tensor(values, dtype=torch.float32)
        return out


_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png", ".png"), (b"\xff\xd8\xff", "image/jpeg", ".jpg"),
               (b"GIF8", "image/gif", ".gif"), (b"BM", "image/bmp", ".bmp"))


def _media_type(data: bytes) -> str:
    """The part's Content-Type from the bytes' signature (a box may check it); WebP by its RIFF header."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((media for magic, media, _ in _SIGNATURES if data.startswith(magic)), "application/octet-stream")


def _extension(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, _, ext in _SIGNATURES if data.startswith(magic)), "")
