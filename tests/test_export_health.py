"""Export health: span counters and last export times, read with `pycrio status` and `crictl info`."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import pytest

from pycrio.cri import api_pb2
from tests.harness import PycrioDaemon, run_pycrio, tracing_args
from tests.otlp_receiver import OTLPReceiver, free_port

# Short export deadline so failures are counted within the test's time.
FAST_EXPORT = {"OTEL_EXPORTER_OTLP_TIMEOUT": "2"}


def _versions(daemon: PycrioDaemon, n: int) -> None:
    with daemon.channel() as ch:
        stub = daemon.runtime(ch)
        for _ in range(n):
            stub.Version(api_pb2.VersionRequest(), timeout=5)


def status(daemon: PycrioDaemon) -> dict[str, Any]:
    """`pycrio status -o json` against the daemon's socket, as an operator runs it."""
    result = run_pycrio("--listen", str(daemon.socket), "status", "-o", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def export(daemon: PycrioDaemon) -> dict[str, Any]:
    return status(daemon)["tracing"]["export"]


def wait_until(daemon: PycrioDaemon, check: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        counters = export(daemon)
        if check(counters):
            return counters
        if time.monotonic() > deadline:
            raise AssertionError(f"export counters never matched: {counters}\n{daemon.logs()[-2000:]}")
        time.sleep(0.3)


def pending(c: dict[str, Any]) -> int:
    """Spans neither exported nor dropped yet (queued or in flight)."""
    return (
        c["spans_started"] + c["spans_kept_for_error"] - c["spans_exported"]
        - c["spans_dropped_export_failed"] - c["spans_dropped_queue_full"]
    )


def test_counters_rise_while_collector_is_down_and_recover(make_daemon) -> None:
    receiver = OTLPReceiver(free_port())  # its port, not started yet: the collector is down
    try:
        daemon = make_daemon(args=tracing_args(receiver.endpoint), env=FAST_EXPORT)
        _versions(daemon, 200)
        down = wait_until(daemon, lambda c: c["spans_dropped_export_failed"] >= 200 and c["failed_exports"] >= 1)
        assert down["spans_started"] >= 201  # the 200 calls and the start-up probe
        assert down["spans_exported"] == 0
        assert down["last_export_success"] is None
        assert "UNAVAILABLE" in down["last_export_error"]
        assert down["failing_since"] is not None
        assert "span export to" in daemon.logs() and "failing" in daemon.logs()

        text = run_pycrio("--listen", str(daemon.socket), "status")
        assert text.returncode == 0, text.stderr
        assert f"tracing: enabled, OTLP/gRPC to {receiver.endpoint}, 1000000 per million" in text.stdout
        assert any(line.split() == ["last", "successful", "export", "never"] for line in text.stdout.splitlines())
        assert "failing since" in text.stdout

        receiver.start()
        _versions(daemon, 50)
        up = wait_until(daemon, lambda c: c["spans_exported"] >= 50 and c["last_export_success"] is not None)
        assert receiver.wait_for(lambda s: s.name.endswith("/Version"), count=50)
        # Drops are history: they never go down, and nothing new is dropped once exports succeed.
        assert up["spans_dropped_export_failed"] >= down["spans_dropped_export_failed"]
        assert up["failing_since"] is None
        assert time.time() - up["last_export_success"] < 30
        # Every span is accounted for once the queue has drained. This Status call's own span is
        # not among them: it is made after the call (pycrio.tracing.call_span), counted then.
        settled = wait_until(daemon, lambda c: pending(c) == 0)
        assert settled["spans_dropped_queue_full"] == 0
        assert "recovered after" in daemon.logs()
    finally:
        receiver.stop()


def test_queue_full_drops_are_counted_and_logged(make_daemon, black_hole) -> None:
    # A hung collector holds the export thread; a queue of 16 then drops all but a few spans.
    env = {**FAST_EXPORT, "OTEL_BSP_MAX_QUEUE_SIZE": "16", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "8"}
    daemon = make_daemon(args=tracing_args(black_hole), env=env)
    _versions(daemon, 300)
    counters = wait_until(daemon, lambda c: c["spans_dropped_queue_full"] >= 250)
    # Up to a queue's worth of calls wait for the held export thread to make their spans
    # (pycrio.tracing.call_span); every later call made its span itself, counted and dropped.
    assert counters["spans_started"] >= 300 - 16
    assert counters["spans_exported"] == 0
    logs = daemon.wait_for_log("span queue full")
    assert logs.count("span queue full") == 1  # once per streak, not per span
    assert daemon.alive()


def test_crictl_info_shows_export_health(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint), env=FAST_EXPORT)
    _versions(daemon, 10)
    wait_until(daemon, lambda c: c["spans_exported"] >= 10)
    info = json.loads(daemon.crictl("info", "-o", "json").stdout)
    tracing = info["tracing"] if isinstance(info["tracing"], dict) else json.loads(info["tracing"])
    assert tracing["enabled"] is True
    assert tracing["endpoint"] == receiver.endpoint
    assert tracing["export"]["spans_exported"] >= 10
    assert tracing["export"]["spans_dropped_export_failed"] == 0


def test_status_when_tracing_is_off_and_when_no_daemon(make_daemon, tmp_path) -> None:
    daemon = make_daemon()
    text = run_pycrio("--listen", str(daemon.socket), "status")
    assert text.returncode == 0, text.stderr
    assert "RuntimeReady" in text.stdout
    assert "tracing: disabled" in text.stdout
    assert "metrics: disabled" in text.stdout

    missing = tmp_path / "nobody.sock"
    result = run_pycrio("--listen", str(missing), "status", "--timeout", "2")
    assert result.returncode == 1
    assert result.stderr.startswith(f"pycrio: no answer from {missing}: UNAVAILABLE")



def test_started_spans_are_counted_exactly_from_many_threads() -> None:
    import sys
    import threading

    from pycrio.tracing.exporter import ExportHealth

    health = ExportHealth()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: a lost update would show
    try:
        threads = [threading.Thread(target=lambda: [health.span_started() for _ in range(20000)]) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch)
    assert health.started == 80000 and health.snapshot()["spans_started"] == 80000
