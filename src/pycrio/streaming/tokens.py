"""The stream server's request cache: single-use, unguessable tokens for validated stream requests.

As the Kubernetes streaming server's requestCache (k8s.io/cri-streaming pkg/streaming/request_cache.go):
an Exec/Attach/PortForward RPC stores its validated request and puts the token in the URL it
returns; the first HTTP request that presents the token takes the request out (used once), and a
token expires `ttl` seconds after it was issued. At most `max_in_flight` tokens live at a time: a
full cache first drops the expired ones, then refuses the new request (RESOURCE_EXHAUSTED, as k8s'
ErrorTooManyInFlight) rather than evicting a live token another client is about to use.

Thread-safe: `insert` runs on gRPC worker threads, `consume` on the stream server's loop.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

import grpc

from pycrio.errors import CRIError

T = TypeVar("T")

DEFAULT_TTL = 60.0  # k8s cacheTTL: 1 minute
MAX_IN_FLIGHT = 1000  # k8s maxInFlight


class TooManyInFlight(CRIError):
    """The cache holds `max_in_flight` live tokens: the RPC is refused, not a live token evicted."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RequestCache(Generic[T]):
    """Token -> request, each token good for one `consume` within `ttl` seconds of its `insert`."""

    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        max_in_flight: int = MAX_IN_FLIGHT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"token ttl must be > 0, got {ttl}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.ttl = ttl
        self.max_in_flight = max_in_flight
        self._clock = clock
        self._lock = threading.Lock()
        # insertion order is expiry order (one ttl for all), so expired entries sit at the front
        self._entries: OrderedDict[str, tuple[float, T]] = OrderedDict()

    def insert(self, request: T) -> str:
        """Store `request`; the token that takes it out once. Raises TooManyInFlight when full."""
        with self._lock:
            now = self._clock()
            self._gc(now)
            if len(self._entries) >= self.max_in_flight:
                raise TooManyInFlight("maximum number of in-flight requests exceeded")
            token = secrets.token_urlsafe()
            while token in self._entries:  # 256 random bits: never in practice
                token = secrets.token_urlsafe()
            self._entries[token] = (now + self.ttl, request)
            return token

    def consume(self, token: str) -> T | None:
        """The request stored under `token`, removed; None when unknown, already used or expired."""
        with self._lock:
            entry = self._entries.pop(token, None)
            if entry is None:
                return None
            expires, request = entry
            if self._clock() > expires:
                return None
            return request

    def __len__(self) -> int:
        with self._lock:
            self._gc(self._clock())
            return len(self._entries)

    def _gc(self, now: float) -> None:
        while self._entries:
            token, (expires, _) = next(iter(self._entries.items()))
            if now <= expires:
                return
            del self._entries[token]
