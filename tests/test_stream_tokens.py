"""The stream server's token cache: single use, expiry, bounded, unguessable, thread-safe."""

from __future__ import annotations

import threading

import grpc
import pytest

from pycrio.streaming.tokens import RequestCache, TooManyInFlight


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_is_single_use() -> None:
    cache: RequestCache[str] = RequestCache(ttl=60)
    token = cache.insert("exec c1")
    assert cache.consume(token) == "exec c1"
    assert cache.consume(token) is None


def test_unknown_token() -> None:
    cache: RequestCache[str] = RequestCache(ttl=60)
    cache.insert("exec c1")
    assert cache.consume("nope") is None
    assert cache.consume("") is None


def test_token_expires_after_ttl() -> None:
    clock = FakeClock()
    cache: RequestCache[str] = RequestCache(ttl=60, clock=clock)
    early, late = cache.insert("a"), cache.insert("b")
    clock.now += 59.9
    assert cache.consume(early) == "a"
    clock.now += 0.2
    assert cache.consume(late) is None  # expired: refused, and gone
    assert len(cache) == 0


def test_full_cache_refuses_new_tokens_until_some_expire() -> None:
    clock = FakeClock()
    cache: RequestCache[int] = RequestCache(ttl=10, max_in_flight=3, clock=clock)
    tokens = [cache.insert(i) for i in range(3)]
    with pytest.raises(TooManyInFlight) as err:
        cache.insert(3)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "maximum number of in-flight requests exceeded" in err.value.message
    # a live token is never evicted to make room
    assert cache.consume(tokens[0]) == 0
    fourth = cache.insert(3)  # room again after a consume
    clock.now += 11  # all expire: gc on insert makes room for new ones
    assert [cache.insert(i) for i in range(3)]
    assert cache.consume(fourth) is None
    assert cache.consume(tokens[1]) is None


def test_tokens_are_unguessable_urlsafe_and_distinct() -> None:
    cache: RequestCache[int] = RequestCache(ttl=60, max_in_flight=10_000)
    tokens = {cache.insert(i) for i in range(2000)}
    assert len(tokens) == 2000
    for token in tokens:
        assert len(token) >= 43  # 256 random bits
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_insert_and_consume_from_many_threads() -> None:
    cache: RequestCache[int] = RequestCache(ttl=60, max_in_flight=100_000)
    issued: list[str] = []
    lock = threading.Lock()

    def issue(base: int) -> None:
        for i in range(500):
            token = cache.insert(base + i)
            with lock:
                issued.append(token)

    threads = [threading.Thread(target=issue, args=(n * 1000,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(issued)) == 4000
    got: list[int] = []

    def take(part: list[str]) -> None:
        for token in part:
            value = cache.consume(token)
            assert value is not None
            with lock:
                got.append(value)

    parts = [issued[i::4] for i in range(4)]
    threads = [threading.Thread(target=take, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(n * 1000 + i for n in range(8) for i in range(500))
    assert len(cache) == 0
