"""Sampling: parent-based ratio; 0 starts nothing but continues a sampled caller."""

from __future__ import annotations

import secrets

import grpc

from pycrio.cri import api_pb2
from tests.harness import drain_startup_probe, metadata_with_parent, tracing_args

LIST = "/runtime.v1.RuntimeService/ListContainers"


def _call(daemon, n: int, metadata=None) -> None:
    with daemon.channel() as ch:
        stub = daemon.runtime(ch)
        for _ in range(n):
            stub.ListContainers(api_pb2.ListContainersRequest(), metadata=metadata, timeout=5)


def test_rate_zero_starts_no_trace_but_continues_a_sampled_parent(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint, rate=0))
    _call(daemon, 50)
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    _call(daemon, 1, metadata=metadata_with_parent(trace_id, parent, sampled=True))
    _call(daemon, 5, metadata=metadata_with_parent(secrets.token_hex(16), parent, sampled=False))
    assert daemon.stop() == 0
    spans = receiver.settle(quiet=0.5)
    assert [(s.name, s.trace_id, s.parent_span_id) for s in spans] == [(LIST, trace_id, parent)]


def test_full_rate_traces_every_call(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint, rate=1_000_000))
    drain_startup_probe(receiver)
    _call(daemon, 300)
    assert daemon.stop() == 0
    spans = receiver.settle(quiet=0.5)
    assert len(spans) == 300
    assert {s.name for s in spans} == {LIST}
    assert len({s.trace_id for s in spans}) == 300  # each a root of its own trace


def test_full_rate_follows_an_unsampled_caller(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint, rate=1_000_000))
    drain_startup_probe(receiver)
    _call(daemon, 20, metadata=metadata_with_parent(secrets.token_hex(16), secrets.token_hex(8), sampled=False))
    assert daemon.stop() == 0
    assert receiver.settle(quiet=0.5) == []


def test_quarter_rate_keeps_about_a_quarter(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint, rate=250_000))
    _call(daemon, 4000)
    assert daemon.stop() == 0
    kept = len(receiver.settle(quiet=0.5, timeout=30))
    # The start-up probe may add one span; 20%..30% of 4000 is 800..1200.
    assert 800 <= kept <= 1201, kept
