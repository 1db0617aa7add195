"""Never block: a missing, vanishing or black-holed collector does not slow or break CRI calls."""

from __future__ import annotations

import socket
import time

import pytest

from pycrio.cri import api_pb2
from tests.harness import tracing_args
from tests.otlp_receiver import OTLPReceiver, free_port

# Short export deadline so failures show up (and are retried) within the test's time.
FAST_EXPORT = {"OTEL_EXPORTER_OTLP_TIMEOUT": "2"}


def _calls(daemon, n: int) -> int:
    ok = 0
    with daemon.channel() as ch:
        stub = daemon.runtime(ch)
        for i in range(n):
            if i % 2:
                stub.Version(api_pb2.VersionRequest(), timeout=5)
            else:
                stub.ListContainers(api_pb2.ListContainersRequest(), timeout=5)
            ok += 1
    return ok


def test_collector_down_at_start(make_daemon) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    daemon = make_daemon(args=tracing_args(endpoint), env=FAST_EXPORT)
    assert _calls(daemon, 500) == 500
    logs = daemon.wait_for_log(f"span export to {endpoint} failing")
    assert _calls(daemon, 100) == 100
    assert daemon.alive()
    # Rate-limited: one report per failure streak and interval, not one per batch.
    assert logs.count("span export to") <= 2
    assert "logger=opentelemetry" not in logs  # the SDK's per-batch lines are summarised, not printed
    assert daemon.stop() == 0


def test_black_holed_collector(make_daemon, black_hole) -> None:
    daemon = make_daemon(args=tracing_args(black_hole), env=FAST_EXPORT)
    assert _calls(daemon, 500) == 500
    daemon.wait_for_log(f"span export to {black_hole} failing")
    assert daemon.alive()
    assert daemon.stop() == 0  # the span flush on SIGTERM is bounded
    assert not daemon.socket.exists()


def test_collector_stopped_mid_run_then_back(make_daemon) -> None:
    receiver = OTLPReceiver().start()
    try:
        daemon = make_daemon(args=tracing_args(receiver.endpoint), env=FAST_EXPORT)
        _calls(daemon, 20)
        assert receiver.wait_for(lambda s: s.service == "pycrio", count=20)

        receiver.stop()
        assert _calls(daemon, 500) == 500
        daemon.wait_for_log(f"span export to {receiver.endpoint} failing")
        assert daemon.alive()

        receiver.clear()
        receiver.start()  # same port
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not receiver.spans():
            _calls(daemon, 10)
            time.sleep(0.5)
        assert receiver.spans(lambda s: s.service == "pycrio"), "spans did not resume after the collector came back"
        daemon.wait_for_log(f"span export to {receiver.endpoint} recovered")
    finally:
        receiver.stop()
