"""The explainer as an object: decode the upload at its own size, run the engine off the event loop, render, count."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import torch
from prometheus_client import Counter, Histogram

from advexplain.services.common.admission import Admission
from advexplain.services.common.metrics import ServiceMetrics
from advexplain.services.explainer.settings import ExplainerSettings
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.errors import InvalidInput
from advexplain.shared.explain import BatchedSurrogate, EnsembleSurrogate, Explanation, SearchOptions, explain
from advexplain.shared.images import Photo, decode_photo
from advexplain.shared.protocols import Classifier, GradientSource
from advexplain.shared.remote import NO_HEALTH_ENDPOINT, READY, RemoteBlackBox
from advexplain.shared.render import render_explanation
from advexplain.shared.saliency import default_saliency, explanation_saliency

EXPLANATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BLACKBOX, WHITEBOX = "blackbox", "whitebox"


@dataclass(frozen=True)
class ExplainParams:
    """One request's parameters: the method's options already validated; label and target still raw text."""

    label: str
    target: str | None
    method: str
    options: SearchOptions
    tau: float
    beta: float
    saliency: str | None = None     # what the map shows (saliency.SALIENCY_SOURCES); None: the method's default


@dataclass
class ExplainResult:
    explanation: Explanation
    pngs: dict[str, bytes]
    params: ExplainParams
    photo: Photo
    saliency: str | None = None     # what the returned map shows; None when there is no map


class RequestOracle:
    """The black box as one request sees it.

    With a box that takes files (`predict_files`: /predict), the photo's first prediction sends the
    upload as it was sent (the box judges the user's own file, not a re-encoding of it); every other
    image, and every image for a box that takes tensors (OIP: the decoded photo, resized to the
    model's input on the query path), goes through `predict_proba`. Counts the images the box
    answered, so a search that fails half-way still shows up in the queries metric (the shared
    client's own counter mixes concurrent requests).
    """

    def __init__(self, remote: Classifier, photo: torch.Tensor, upload: bytes | None):
        self.remote = remote
        self.classes = remote.classes
        self.images = 0
        self._photo = photo
        self._upload = upload if callable(getattr(remote, "predict_files", None)) else None

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        if self._upload is not None and x.shape[0] == 1 and torch.equal(x[0], self._photo):
            upload, self._upload = self._upload, None
            probs = self.remote.predict_files([upload])
        else:
            probs = self.remote.predict_proba(x)
        self.images += int(x.shape[0])
        return probs


def parse_class(text: str, classes: tuple[str, ...], what: str = "label") -> int:
    """A class name, or an index into `classes`; names win when a class is named like a number."""
    if text in classes:
        return classes.index(text)
    stripped = text.strip()
    if stripped.isdigit() and int(stripped) < len(classes):
        return int(stripped)
    raise InvalidInput(f"unknown {what} {text!r}: use one of {', '.join(classes)} or an index 0-{len(classes) - 1}")


def load_surrogate(settings: ExplainerSettings) -> GradientSource:
    """One surrogate as itself, several as an EnsembleSurrogate (their margins and gradients summed);
    with `surrogate_batch` > 0 each network is shared through a BatchedSurrogate (close with
    `close_surrogate`)."""
    device = str(settings.torch_device)
    # Frozen: concurrent searches share these networks and take input gradients only.
    members: list = [LocalClassifier.from_checkpoint(path, device=device).freeze() for path in settings.surrogate]
    if settings.surrogate_batch > 0:
        members = [BatchedSurrogate(m, max_batch=settings.surrogate_batch) for m in members]
    return members[0] if len(members) == 1 else EnsembleSurrogate(members)


def close_surrogate(source: GradientSource) -> None:
    """Stop the batching threads of a surrogate from `load_surrogate` (nothing to do without batching)."""
    for member in getattr(source, "members", [source]):
        if isinstance(member, BatchedSurrogate):
            member.close()


def build_http_client(settings: ExplainerSettings) -> httpx.Client:
    """The pooled client to the black box: timeouts and connect-only retries live on the transport."""
    limits = httpx.Limits(max_connections=settings.blackbox_connections,
                          max_keepalive_connections=settings.blackbox_connections)
    return httpx.Client(
        transport=httpx.HTTPTransport(retries=settings.connect_retries, limits=limits),
        timeout=httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout),
    )


class Explainer:
    """The loaded surrogate(s), the remote black box and (optionally) the white box; on `app.state.explainer`.

    `classes` are the surrogate's (or the `classes` setting's): the names the black box's answers
    are checked against.
    """

    def __init__(self, settings: ExplainerSettings, metrics: ServiceMetrics, surrogate: GradientSource,
                 blackbox: RemoteBlackBox, whitebox: LocalClassifier | None = None):
        self.settings = settings
        self.surrogate = surrogate
        self.blackbox = blackbox
        self.whitebox = whitebox
        self.classes = tuple(blackbox.classes)
        self.admission = Admission(settings.max_concurrency, settings.max_queue, settings.max_queue_wait,
                                   namespace=metrics.namespace, registry=metrics.registry, what="explanation")
        self.surrogates = len(settings.surrogate)
        ns, reg = metrics.namespace, metrics.registry
        self._explanations = Counter("explanations", "Explanations by route and outcome "
                                     "(success, already_correct, failed, error)", ["route", "outcome"],
                                     namespace=ns, registry=reg)
        self._queries = Counter("oracle_queries", "Images sent to the oracle (the black box, or the white box "
                                "in-process), errors included", ["route"], namespace=ns, registry=reg)
        self._seconds = Histogram("explanation_duration_seconds", "Decode, search, saliency and rendering of one "
                                  "explanation", ["route", "outcome"], namespace=ns, registry=reg,
                                  buckets=EXPLANATION_BUCKETS)

    async def explain(self, data: bytes, params: ExplainParams, route: str = BLACKBOX) -> ExplainResult:
        """Run one explanation in a worker thread; at most `max_concurrency` run at once, at most `max_queue`
        wait (each up to `max_queue_wait` s), and the rest get Overloaded (503, Retry-After) at once."""
        return await self.admission.run(self._explain, data, params, route)

    def _explain(self, data: bytes, params: ExplainParams, route: str) -> ExplainResult:
        started = time.perf_counter()
        white = route == WHITEBOX
        source: GradientSource = self.whitebox if white else self.surrogate  # type: ignore[assignment]
        oracle = None
        result: Explanation | None = None
        outcome = "error"
        try:
            label = parse_class(params.label, self.classes)
            target = None if params.target is None else parse_class(params.target, self.classes, "target")
            photo = decode_photo(data, self.settings.max_pixels, self.settings.max_side)
            if white:
                oracle = self.whitebox
            else:
                oracle = RequestOracle(self.blackbox, photo.image, None if photo.downscaled else data)
            result = explain(photo.image, label, source, oracle, params.method, target=target, whitebox=white,
                             options=params.options)
            saliency, shows = None, None
            if result.perturbation is not None:
                saliency, shows = explanation_saliency(result.perturbation, photo.image,
                                                       params.saliency or default_saliency(params.method),
                                                       params.tau, params.beta)
            pngs = render_explanation(result, saliency)
            outcome = "already_correct" if result.already_correct else "success" if result.success else "failed"
            return ExplainResult(result, pngs, params, photo, shows)
        finally:
            # A search that failed half-way still spent the images the black box answered.
            spent = oracle.images if isinstance(oracle, RequestOracle) else result.queries if result is not None else 0
            self._queries.labels(route=route).inc(spent)
            self._explanations.labels(route=route, outcome=outcome).inc()
            self._seconds.labels(route=route, outcome=outcome).observe(time.perf_counter() - started)

    def blackbox_health(self) -> tuple[bool, str]:
        """(ready, why) from the black box's `health()` within `health_timeout`; counts no query.

        /predict boxes answer their optional /healthz, OIP servers `/v2/health/ready` and the model's
        ready. A /predict box without a health endpoint (it answers 404 or 405) counts as ready:
        `/predict` is all a black box has to offer.
        """
        state, detail = self.blackbox.health(timeout=self.settings.health_timeout)
        return state in (READY, NO_HEALTH_ENDPOINT), detail
