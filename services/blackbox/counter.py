"""The query counter: every classified image counts one, per client and in total, exactly under concurrency."""

from __future__ import annotations

import threading
from collections import OrderedDict

from advexplain.shared.errors import InvalidInput
from advexplain.shared.wire import CLIENT_ID, CLIENT_ID_HEADER, CLIENT_ID_RULE

DEFAULT_CLIENT = "anonymous"
DEFAULT_MAX_CLIENTS = 10_000


def parse_client_id(header: str | None) -> str:
    """The `X-Client-Id` header as a client id; missing or empty means `anonymous`."""
    if header is None or header == "":
        return DEFAULT_CLIENT
    if not CLIENT_ID.fullmatch(header):
        raise InvalidInput(f"{CLIENT_ID_HEADER} must be {CLIENT_ID_RULE}")
    return header


class QueryCounter:
    """Running totals per client and overall. `add` is atomic and returns the client's new total.

    Memory is bounded: at most `max_clients` client ids keep their own running total, least recently
    used first out. Any client can mint ids (the header is free text), so without a bound a caller
    could grow this map until the process dies. An evicted client's count moves to `retired`, so
    nothing is lost: `total == sum(snapshot().values()) + retired` always holds. A client that comes
    back after eviction starts again from zero in its own total (X-Query-Count); a client that keeps
    querying is never evicted while fewer than `max_clients` other ids appear between two of its queries.
    """

    def __init__(self, max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        if max_clients < 1:
            raise ValueError("max_clients must be >= 1")
        self.max_clients = max_clients
        self._lock = threading.Lock()
        self._by_client: OrderedDict[str, int] = OrderedDict()
        self._total = 0
        self._retired = 0

    def add(self, client: str, images: int) -> int:
        with self._lock:
            count = self._by_client.pop(client, 0) + images
            self._by_client[client] = count  # (re)inserted last: the most recently used
            self._total += images
            while len(self._by_client) > self.max_clients:
                _, evicted = self._by_client.popitem(last=False)
                self._retired += evicted
            return count

    def of(self, client: str) -> int:
        with self._lock:
            return self._by_client.get(client, 0)

    @property
    def total(self) -> int:
        with self._lock:
            return self._total

    @property
    def retired(self) -> int:
        """Images counted for clients evicted from the per-client map (still in `total`)."""
        with self._lock:
            return self._retired

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_client)
