"""Admission control: at most `capacity` jobs at once, a bounded queue in front of them, a bounded wait in it.

A service that queues without bound answers everyone, late: under a burst every request waits behind
all the others and clients time out. Here a request that would wait behind more than `max_queue`
others, or that has waited `max_wait` seconds without a slot, is refused with `Overloaded` (503,
`{"error": {"code": "overloaded", ...}}`, `Retry-After`), so the requests that are admitted keep
their latency and a client can tell a busy service from a dead one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

import anyio
from prometheus_client import Counter, Gauge, Histogram

from advexplain.services.common.errors import Overloaded

T = TypeVar("T")

WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_RETRY_AFTER = 60
QUEUE_FULL, WAITED_TOO_LONG = "queue_full", "wait_timeout"


class Admission:
    """Runs blocking jobs in worker threads, `capacity` at once, in arrival order.

    `max_queue`: how many may wait for a slot (None: any number; 0: none, refuse whenever every
    slot is busy). `max_wait`: seconds one may wait (None: no limit). A refusal's `Retry-After` is
    the expected time for the jobs ahead to finish, from a moving average of job durations.
    Counters are touched on the event loop only, so they need no lock. Create it inside the app's
    lifespan (one event loop).

        admission = Admission(2, max_queue=8, max_wait=10.0)
        probs = await admission.run(model.predict_proba, batch)   # or raises Overloaded
    """

    def __init__(self, capacity: int, max_queue: int | None, max_wait: float | None, *,
                 namespace: str | None = None, registry=None, what: str = "request"):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.what = what
        self.running = 0
        self.waiting = 0
        self._slots = anyio.Semaphore(capacity)
        # The job's own thread pool: the default one (40 threads) also serves plain `def` routes.
        self._threads = anyio.CapacityLimiter(capacity)
        self._mean_seconds = 1.0
        self._finished = 0
        self._metrics = None
        if registry is not None:
            self._metrics = (
                Gauge("admission_running", f"{what}s running now", namespace=namespace, registry=registry,
                      multiprocess_mode="livesum"),
                Gauge("admission_queued", f"{what}s waiting for a slot now", namespace=namespace, registry=registry,
                      multiprocess_mode="livesum"),
                Counter("admission_refused", f"{what}s refused with 503 overloaded, by reason "
                        f"({QUEUE_FULL}, {WAITED_TOO_LONG})", ["reason"], namespace=namespace, registry=registry),
                Histogram("admission_wait_seconds", f"time an admitted {what} waited for a slot",
                          namespace=namespace, registry=registry, buckets=WAIT_BUCKETS),
            )
            for reason in (QUEUE_FULL, WAITED_TOO_LONG):
                self._metrics[2].labels(reason=reason)

    def retry_after(self) -> int:
        """Whole seconds until the jobs running and waiting now are expected to be done (1 to 60)."""
        ahead = (self.running + self.waiting) / self.capacity
        return max(1, min(MAX_RETRY_AFTER, math.ceil(ahead * self._mean_seconds)))

    def _refuse(self, reason: str, message: str) -> Overloaded:
        if self._metrics is not None:
            self._metrics[2].labels(reason=reason).inc()
        return Overloaded(message, headers={"Retry-After": str(self.retry_after())}, reason=reason)

    async def run(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` in a worker thread once a slot is free; Overloaded if none is free in time."""
        if self.max_queue is not None and self.running + self.waiting >= self.capacity + self.max_queue:
            raise self._refuse(QUEUE_FULL, f"overloaded: {self.running} {self.what}s running and {self.waiting} "
                                           f"waiting, the queue holds {self.max_queue}; retry later")
        queued = time.perf_counter()
        self._gauge(queued=+1)
        self.waiting += 1
        try:
            with anyio.move_on_after(self.max_wait) as wait:
                await self._slots.acquire()
        finally:
            self.waiting -= 1
            self._gauge(queued=-1)
        if wait.cancelled_caught:
            raise self._refuse(WAITED_TOO_LONG, f"overloaded: no free slot within {self.max_wait:g} s; retry later")
        started = time.perf_counter()
        if self._metrics is not None:
            self._metrics[3].observe(started - queued)
        self.running += 1
        self._gauge(running=+1)
        try:
            # Not abandoned on cancellation: the slot stays taken until the thread has finished.
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._threads)
        finally:
            self.running -= 1
            self._gauge(running=-1)
            self._slots.release()
            self._observe(time.perf_counter() - started)

    def _observe(self, seconds: float) -> None:
        # A plain mean for the first few, then an exponential moving average that follows drift.
        self._finished += 1
        weight = max(1 / self._finished, 0.1)
        self._mean_seconds += weight * (seconds - self._mean_seconds)

    def _gauge(self, running: int = 0, queued: int = 0) -> None:
        if self._metrics is not None:
            if running:
                self._metrics[0].inc(running)
            if queued:
                self._metrics[1].inc(queued)
