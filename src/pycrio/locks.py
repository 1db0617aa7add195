"""Per-key locks (a digest, a pod or container id), created on demand and dropped when idle."""

from __future__ import annotations

import threading
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator


class KeyedLocks:
    """One lock per key; holders of different keys never wait on each other."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}
        self._users: dict[str, int] = defaultdict(int)

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        lock = self._use(key)
        try:
            with lock:
                yield
        finally:
            self._release(key)

    @contextmanager
    def try_hold(self, key: str) -> Iterator[bool]:
        """Hold the lock of `key` if nobody else does (yields True), else do not wait (False)."""
        lock = self._use(key)
        acquired = lock.acquire(blocking=False)
        try:
            yield acquired
        finally:
            if acquired:
                lock.release()
            self._release(key)

    def _use(self, key: str) -> threading.RLock:
        with self._guard:
            lock = self._locks.setdefault(key, threading.RLock())
            self._users[key] += 1
        return lock

    def _release(self, key: str) -> None:
        with self._guard:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                del self._locks[key]
