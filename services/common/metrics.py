"""Prometheus metrics on a registry per app (several apps can live in one process), and a timing middleware.

With several worker processes on one port (`serve explainer --workers N`) each process counts into
files under PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, chosen when the variable is
set before prometheus_client is first imported) and /metrics answers the sum over all of them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNMATCHED_ROUTE = "unmatched"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@contextlib.contextmanager
def multiprocess_directory(prefix: str) -> Iterator[Path]:
    """The folder for multiprocess metrics, empty: PROMETHEUS_MULTIPROC_DIR when the operator set it (its
    old *.db files removed, the folder kept), else a new temporary folder, removed afterwards."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=f"advexplain-metrics-{prefix}") as tmp:
        yield Path(tmp)


class BoundedLabels:
    """Maps free-form values (client ids) to label values, at most `limit` distinct ones plus `overflow`.

    A Prometheus label value is a time series; without a cap any client could create unbounded ones.
    The first `limit` distinct values keep their own label, every later one shares `overflow`.
    """

    def __init__(self, limit: int, overflow: str = "other"):
        self.limit = limit
        self.overflow = overflow
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        with self._lock:
            if value in self._known:
                return value
            if len(self._known) < self.limit and value != self.overflow:
                self._known.add(value)
                return value
            return self.overflow


class ServiceMetrics:
    """Request latency by route and errors by code, on this service's own registry."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self.latency = Histogram(
            "request_duration_seconds", "Time from request start to the end of the response",
            ["method", "route", "status"], namespace=namespace, registry=self.registry, buckets=LATENCY_BUCKETS,
        )
        self.errors = Counter(
            "errors", "Error answers by error code and HTTP status", ["code", "status"],
            namespace=namespace, registry=self.registry,
        )

    def record_error(self, code: str, status: int) -> None:
        self.errors.labels(code=code, status=str(status)).inc()

    def exposition(self) -> tuple[bytes, str]:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        # Every worker's files, merged (counters and histograms summed, live gauges summed over live pids).
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def close(self) -> None:
        """At shutdown: this process's live gauges stop counting in the other workers' /metrics."""
        if self.multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)


class LatencyMiddleware:
    """Pure ASGI middleware: observes every HTTP request's duration under its route template."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # The template, never the raw path: raw paths would be unbounded label values.
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            method = scope.get("method", "")
            self.metrics.latency.labels(
                method=method if method in METHODS else "other", route=template, status=str(status)
            ).observe(time.perf_counter() - started)
