"""The explainer as an object: decode the upload, run the engine off the event loop, render the PNGs, count."""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio
import httpx
import torch
from prometheus_client import Counter, Histogram

from advexplain.services.common.images import decode_image
from advexplain.services.common.metrics import ServiceMetrics
from advexplain.services.explainer.settings import ExplainerSettings
from advexplain.shared.classifiers import LocalClassifier
from advexplain.shared.errors import InvalidInput, UpstreamBadResponse
from advexplain.shared.explain import EnsembleSurrogate, Explanation, explain
from advexplain.shared.remote import RemoteClassifier
from advexplain.shared.render import render_explanation
from advexplain.shared.saliency import saliency_map

EXPLANATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BLACKBOX, WHITEBOX = "blackbox", "whitebox"


@dataclass(frozen=True)
class ExplainParams:
    """One request's parameters, already range-checked by the route (label is still the raw text)."""

    label: str
    method: str
    max_queries: int
    alpha: float
    tau: float
    beta: float


@dataclass
class ExplainResult:
    explanation: Explanation
    pngs: dict[str, bytes]
    params: ExplainParams


class CountingOracle:
    """The oracle of one request: counts the images it answered, so a search that fails half-way
    still shows up in the queries metric. Created per request; the shared RemoteClassifier's own
    counter mixes concurrent requests."""

    def __init__(self, oracle):
        self.oracle = oracle
        self.classes = tuple(oracle.classes)
        self.images = 0

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.oracle.predict_proba(x)
        self.images += int(x.shape[0])
        return probs


def parse_label(text: str, classes: tuple[str, ...]) -> int:
    """A class name, or an index into `classes`; names win when a class is named like a number."""
    if text in classes:
        return classes.index(text)
    stripped = text.strip()
    if stripped.isdigit() and int(stripped) < len(classes):
        return int(stripped)
    raise InvalidInput(f"unknown label {text!r}: use one of {', '.join(classes)} or an index 0-{len(classes) - 1}")


def source_size(source) -> int:
    """The input size uploads are resized to: the model's, or an ensemble's first member's (each
    member resizes again to its own size when they differ)."""
    members = getattr(source, "members", None)
    return (members[0] if members else source).image_size


def load_surrogate(settings: ExplainerSettings):
    """One surrogate as itself, several as an EnsembleSurrogate (their gradients summed)."""
    device = str(settings.torch_device)
    members = [LocalClassifier.from_checkpoint(path, device=device) for path in settings.surrogate]
    return members[0] if len(members) == 1 else EnsembleSurrogate(members)


def build_http_client(settings: ExplainerSettings) -> httpx.Client:
    """The pooled client to the black box: timeouts and connect-only retries live on the transport."""
    limits = httpx.Limits(max_connections=settings.blackbox_connections,
                          max_keepalive_connections=settings.blackbox_connections)
    return httpx.Client(
        transport=httpx.HTTPTransport(retries=settings.connect_retries, limits=limits),
        timeout=httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout),
    )


class Explainer:
    """The loaded surrogate(s), the remote black box and (optionally) the white box; on `app.state.explainer`."""

    def __init__(self, settings: ExplainerSettings, metrics: ServiceMetrics, surrogate, blackbox: RemoteClassifier,
                 http: httpx.Client, whitebox: LocalClassifier | None = None):
        self.settings = settings
        self.surrogate = surrogate
        self.blackbox = blackbox
        self.whitebox = whitebox
        self._http = http
        self._limiter = anyio.CapacityLimiter(settings.max_concurrency)
        self.surrogates = len(getattr(surrogate, "members", [surrogate]))
        self.image_size = source_size(surrogate)
        self.classes = tuple(surrogate.classes)
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
        """Run one explanation in a worker thread; at most `max_concurrency` run at once."""
        return await anyio.to_thread.run_sync(self._explain, data, params, route, limiter=self._limiter)

    def _explain(self, data: bytes, params: ExplainParams, route: str) -> ExplainResult:
        started = time.perf_counter()
        # White-box: the real model is both gradient source and oracle, passed as the same object so
        # that the engine sees it is exact (the margin search then needs no transfer margin).
        source = self.whitebox if route == WHITEBOX else self.surrogate
        counting: CountingOracle | None = None
        result: Explanation | None = None
        outcome = "error"
        try:
            label = parse_label(params.label, tuple(source.classes))
            image = decode_image(data, source_size(source), self.settings.max_pixels, name="image")
            if route == WHITEBOX:
                oracle = self.whitebox
            else:
                oracle = counting = CountingOracle(self.blackbox)  # the classes: GET /healthz, once per process
                if counting.classes != self.classes:
                    raise UpstreamBadResponse(f"the black box's classes {counting.classes} are not the surrogate's "
                                              f"{self.classes}: the explainer is configured with the wrong models")
            result = explain(image, label, source, oracle, params.method,
                             max_queries=params.max_queries, alpha=params.alpha)
            saliency = None if result.perturbation is None else saliency_map(result.perturbation, params.tau, params.beta)
            pngs = render_explanation(result, saliency)
            outcome = "already_correct" if result.already_correct else "success" if result.success else "failed"
            return ExplainResult(result, pngs, params)
        finally:
            # A search that failed half-way still spent the images the black box answered.
            spent = counting.images if counting is not None else result.queries if result is not None else 0
            self._queries.labels(route=route).inc(spent)
            self._explanations.labels(route=route, outcome=outcome).inc()
            self._seconds.labels(route=route, outcome=outcome).observe(time.perf_counter() - started)

    def blackbox_health(self) -> tuple[bool, str]:
        """(answers, why): GET the black box's /healthz within `health_timeout`. Blocking; counts no query."""
        url = f"{self.settings.blackbox_url}/healthz"
        try:
            resp = self._http.get(url, timeout=self.settings.health_timeout)
        except httpx.TimeoutException:
            return False, f"no answer from {url} within {self.settings.health_timeout}s"
        except httpx.HTTPError as exc:
            return False, f"cannot reach {url}: {type(exc).__name__}"
        if resp.status_code != 200:
            return False, f"{url} answered {resp.status_code}"
        return True, "ready"
