"""The span relay: a monitor's batches go as datagrams to the daemon, which exports them inside its
own requests, to a real OTLP/gRPC receiver; bad datagrams are refused without spoiling the
daemon's spans; bounds and failures are counted; the monitor's end reconnects after a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from pycrio.config import TracingConfig
from pycrio.tracing import batch as batch_module
from pycrio.tracing import provider as provider_module
from pycrio.tracing.exporter import ExportHealth
from pycrio.tracing.otlp_encode import SpanEncoder
from pycrio.tracing.provider import Tracing
from pycrio.tracing.relay import MAX_PAYLOAD, BadDatagram, RelaySpanExporter, SpanRelay, pack, unpack
from pycrio.tracing.span import LightTracerProvider
from tests.otlp_receiver import OTLPReceiver


class Monitor:
    """What a monitor's tracing makes: spans of its own resource, exported to the relay."""

    def __init__(self, relay: Path, pod_id: str = "pod-1", health: ExportHealth | None = None) -> None:
        self.health = health or ExportHealth()
        self.exporter = RelaySpanExporter(relay, self.health)
        resource = Resource({"service.name": "pycrio-monitor", "pod.id": pod_id})
        self.provider = LightTracerProvider(sampler=ALWAYS_ON, resource=resource)
        self.tracer = self.provider.get_tracer("pycrio")

    def export(self, *names: str, attribute: str = "") -> SpanExportResult:
        spans = []
        for name in names:
            span = self.tracer.start_span(name)
            if attribute:
                span.set_attribute("big", attribute)
            span.end()
            spans.append(span)
        return self.exporter.export(spans)


def wait_for(check: Callable[[], object], timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    return check()


@pytest.fixture
def daemon_tracing(receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch):
    """The daemon's Tracing (batch delay 200 ms) exporting to the receiver, with its relay bound."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    # the process's global provider is set once: leave it to the tests that use it (step spans)
    monkeypatch.setattr(provider_module.trace, "set_tracer_provider", lambda provider: None)
    tracing = Tracing(TracingConfig(enable_tracing=True, tracing_endpoint=receiver.endpoint,
                                    tracing_sampling_rate_per_million=1_000_000))  # fmt: skip
    yield tracing
    tracing.shutdown(5.0)


@pytest.fixture
def relay(daemon_tracing: Tracing, tmp_path: Path):
    relay = SpanRelay(tmp_path / "monitor-spans.sock", daemon_tracing.relay)
    relay.start()
    yield relay
    relay.close()


def test_monitor_spans_reach_the_collector_in_the_daemons_export_with_their_own_resource(
    daemon_tracing: Tracing, relay: SpanRelay, receiver: OTLPReceiver
) -> None:
    monitor = Monitor(relay.path, pod_id="pod-a")
    assert monitor.export("create_container", "start_container") is SpanExportResult.SUCCESS
    daemon_tracing.tracer.start_span("/runtime.v1.RuntimeService/CreateContainer").end()
    found = wait_for(lambda: len(receiver.spans()) >= 3 and receiver.spans())
    assert found, receiver.spans()
    by_name = {s.name: s for s in receiver.spans()}
    assert by_name["create_container"].resource["service.name"] == "pycrio-monitor"
    assert by_name["create_container"].resource["pod.id"] == "pod-a"
    assert by_name["start_container"].resource["pod.id"] == "pod-a"
    assert by_name["/runtime.v1.RuntimeService/CreateContainer"].resource["service.name"] == "pycrio"
    counters = wait_for(lambda: (c := daemon_tracing.health.snapshot())["spans_exported"] >= 3 and c)
    assert counters["spans_relayed"] == 2 and counters["spans_exported"] == 3, counters
    assert relay.received == 2 and relay.rejected == 0
    assert monitor.health.snapshot()["spans_dropped_export_failed"] == 0


def test_a_batch_larger_than_a_datagram_is_sent_in_parts_and_all_arrive(relay: SpanRelay, receiver: OTLPReceiver) -> None:
    monitor = Monitor(relay.path)
    names = [f"exec_sync_{i}" for i in range(40)]
    assert monitor.export(*names, attribute="x" * 8000) is SpanExportResult.SUCCESS  # ~320 KB encoded
    assert wait_for(lambda: len(receiver.spans()) == 40), len(receiver.spans())
    assert sorted(s.name for s in receiver.spans()) == sorted(names)
    assert relay.received == 40


def test_bad_datagrams_are_refused_counted_and_spoil_nothing(
    daemon_tracing: Tracing, relay: SpanRelay, receiver: OTLPReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    good = SpanEncoder().encode_request([_ended("fine")])
    bad = [
        b"",
        b"PCS1",
        pack(1, b""),
        b"XXXX" + pack(1, good)[4:],
        pack(0, good),
        pack(1, b"\x12\x02ab"),  # another field than resource_spans
        pack(1, good[:-1]),  # a field runs past the end
        pack(1, good + b"\x0a"),  # a truncated length
    ]
    for datagram in bad:
        with pytest.raises(BadDatagram):
            unpack(datagram)
        relay.handle(datagram)
    assert relay.rejected == len(bad) and relay.received == 0
    assert "ignored a datagram that is no span batch" in caplog.text
    assert unpack(pack(1, good)) == (1, good)
    # the daemon's own spans still go out, in requests the collector accepts
    daemon_tracing.tracer.start_span("own").end()
    assert wait_for(lambda: receiver.spans(lambda s: s.name == "own"))
    assert daemon_tracing.health.snapshot()["spans_relayed"] == 0


def test_relayed_spans_are_dropped_and_counted_while_tracing_is_off_or_over_the_bound(
    daemon_tracing: Tracing, relay: SpanRelay, receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor = Monitor(relay.path)
    daemon_tracing.apply(TracingConfig(enable_tracing=False))
    assert monitor.export("while_off") is SpanExportResult.SUCCESS  # the datagram was delivered
    assert wait_for(lambda: daemon_tracing.health.snapshot()["spans_relay_dropped"] == 1)
    daemon_tracing.apply(TracingConfig(enable_tracing=True, tracing_endpoint=receiver.endpoint,
                                       tracing_sampling_rate_per_million=1_000_000))  # fmt: skip
    pipeline = daemon_tracing.pipeline
    assert pipeline is not None
    payload = SpanEncoder().encode_request([_ended("bounded")])
    monkeypatch.setattr(batch_module, "MAX_ENCODED_BYTES", len(payload) * 2)
    with pipeline.batch._export_lock:  # the export thread is held: the relayed bytes pile up
        accepted = [pipeline.batch.add_encoded(1, payload) for _ in range(3)]
    assert accepted == [True, True, False]
    counters = daemon_tracing.health.snapshot()
    assert counters["spans_relay_dropped"] == 2 and counters["spans_relayed"] == 2
    assert wait_for(lambda: len(receiver.spans(lambda s: s.name == "bounded")) == 2)
    assert receiver.spans(lambda s: s.name == "while_off") == []


def test_the_monitor_counts_a_stopped_daemon_and_reconnects_to_a_restarted_one(
    daemon_tracing: Tracing, tmp_path: Path, receiver: OTLPReceiver
) -> None:
    path = tmp_path / "monitor-spans.sock"
    monitor = Monitor(path)
    assert monitor.export("no_daemon_yet") is SpanExportResult.FAILURE
    assert str(path) in monitor.health.snapshot()["last_export_error"]
    first = SpanRelay(path, daemon_tracing.relay)
    first.start()
    assert monitor.export("first") is SpanExportResult.SUCCESS
    first.close()
    assert not path.exists()
    assert monitor.export("between") is SpanExportResult.FAILURE
    second = SpanRelay(path, daemon_tracing.relay)  # the restarted daemon binds the same path
    second.start()
    try:
        assert monitor.export("second") is SpanExportResult.SUCCESS
        assert wait_for(lambda: {"first", "second"} <= {s.name for s in receiver.spans()})
        assert {s.name for s in receiver.spans()} == {"first", "second"}
    finally:
        second.close()


def test_a_single_span_larger_than_a_datagram_fails_clearly(relay: SpanRelay) -> None:
    monitor = Monitor(relay.path)
    result = monitor.export("huge", attribute="y" * (MAX_PAYLOAD * 2))
    assert result is SpanExportResult.FAILURE
    assert "over the relay" in monitor.health.snapshot()["last_export_error"]
    assert monitor.export("after") is SpanExportResult.SUCCESS  # the exporter goes on


def _ended(name: str):
    provider = LightTracerProvider(sampler=ALWAYS_ON, resource=Resource({"service.name": "pycrio-monitor"}))
    span = provider.get_tracer("pycrio").start_span(name)
    span.end()
    return span
