"""The query counter: every classified image counts one, per client and in total, exactly under concurrency."""

from __future__ import annotations

import re
import threading

from shared.errors import InvalidInput

DEFAULT_CLIENT = "anonymous"
MAX_CLIENT_ID = 64
# Printable ASCII without spaces: it ends up in logs, headers and (bounded) metric labels.
CLIENT_ID = re.compile(r"[!-~]{1,%d}" % MAX_CLIENT_ID)


def parse_client_id(header: str | None) -> str:
    """The `X-Client-Id` header as a client id; missing or empty means `anonymous`."""
    if header is None or header == "":
        return DEFAULT_CLIENT
    if not CLIENT_ID.fullmatch(header):
        raise InvalidInput(f"X-Client-Id must be 1-{MAX_CLIENT_ID} printable ASCII characters without spaces")
    return header


class QueryCounter:
    """Running totals per client and overall. `add` is atomic and returns the client's new total.

    Memory grows with the number of distinct client ids (each at most 64 characters); the metric
    labels derived from them are capped separately (services.common.metrics.BoundedLabels).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_client: dict[str, int] = {}
        self._total = 0

    def add(self, client: str, images: int) -> int:
        with self._lock:
            count = self._by_client.get(client, 0) + images
            self._by_client[client] = count
            self._total += images
            return count

    def of(self, client: str) -> int:
        with self._lock:
            return self._by_client.get(client, 0)

    @property
    def total(self) -> int:
        with self._lock:
            return self._total

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_client)
