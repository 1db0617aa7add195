"""pycrio's OTLP span encoder writes exactly the bytes of the SDK's encode_spans().SerializeToString(),
and the exporter built on it delivers spans to a real OTLP receiver."""

from __future__ import annotations

import math
from typing import Any, Iterator

import pytest
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.common._internal import _encode_value
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceState

from pycrio.tracing.otlp_encode import SpanEncoder, Unsupported, _any_value, sdk_encode
from pycrio.tracing.otlp_exporter import FastOTLPSpanExporter
from pycrio.tracing.provider import make_resource
from pycrio.tracing.sampling import _as_kept
from pycrio.tracing.span import LightTracerProvider
from tests.otlp_receiver import OTLPReceiver

LIST = "/runtime.v1.RuntimeService/ListContainers"


class Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


# Every test runs with the SDK's spans and with pycrio's LightSpan (what the daemon makes).
PROVIDER_CLASSES: dict[str, type[TracerProvider]] = {"sdk": TracerProvider, "light": LightTracerProvider}
_provider_class: type[TracerProvider] = TracerProvider


@pytest.fixture(autouse=True, params=sorted(PROVIDER_CLASSES))
def span_class(request: pytest.FixtureRequest) -> Iterator[str]:
    global _provider_class
    _provider_class = PROVIDER_CLASSES[request.param]
    yield request.param
    _provider_class = TracerProvider


def provider(resource: Resource | None = None, limits: SpanLimits | None = None) -> tuple[TracerProvider, Keep]:
    keep = Keep()
    p = _provider_class(resource=resource or make_resource(), span_limits=limits)
    p.add_span_processor(SimpleSpanProcessor(keep))
    return p, keep


def call_span(tracer: trace.Tracer, events: int = 1, request_id: str = "5f0c1a2e-0000-4000-8000-000000000000") -> None:
    """A span as the CRI interceptor makes it, with `events` log events."""
    span = tracer.start_span(
        LIST,
        kind=SpanKind.SERVER,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": "runtime.v1.RuntimeService",
            "rpc.method": "ListContainers",
            "id": request_id,
            "name": LIST,
        },
    )
    for i in range(events):
        span.add_event(
            "log",
            {
                "log.severity": "DEBUG",
                "log.message": f"Request: ListContainersRequest: {i}",
                "code.function": "_begin",
                "code.filepath": "/src/pycrio/tracing/interceptor.py",
                "code.lineno": 194 + i,
                "id": request_id,
                "name": LIST,
            },
        )
    span.set_attribute("rpc.grpc.status_code", 0)
    span.end()


def same_bytes(spans: list[ReadableSpan], encoder: SpanEncoder | None = None) -> bytes:
    ours = (encoder or SpanEncoder()).encode_request(spans)
    reference = sdk_encode(spans)
    assert ours == reference, _first_difference(ours, reference)
    return ours


def _first_difference(a: bytes, b: bytes) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"lengths {len(a)}/{len(b)}, first difference at {n}: {a[n - 8:n + 16].hex(' ')} vs {b[n - 8:n + 16].hex(' ')}"


def test_call_spans_with_and_without_log_events() -> None:
    p, keep = provider()
    tracer = p.get_tracer("pycrio", "0.1.0")
    encoder = SpanEncoder()
    for events in (0, 1, 3):
        keep.spans.clear()
        for i in range(200):  # past the per-key value cache: request ids differ per span
            call_span(tracer, events, request_id=f"{i:08x}-0000-4000-8000-000000000000")
        same_bytes(keep.spans, encoder)  # caches warm from the previous batch
    assert same_bytes([], encoder) == b""


VALUES: list[Any] = [
    "", "plain", "ünïcødé ✓", "x" * 20000, True, False, 0, 1, -1, 127, 128, 16383, 16384, 2**62, -(2**63), 2**63 - 1,
    0.0, -0.0, 1.5, -2.25e300, math.inf, -math.inf, b"", b"\x00\xffbytes",
    (), ("a", "b"), (True, False), (1, -2, 3), (1.5, 2.5), (b"x",), ("a", None), [1, 2],
]


@pytest.mark.parametrize("value", VALUES, ids=[repr(v)[:20] for v in VALUES])
def test_every_attribute_value_type(value: Any) -> None:
    assert _any_value(value) == _encode_value(value).SerializeToString()
    p, keep = provider()
    tracer = p.get_tracer("t")
    with tracer.start_as_current_span("s", attributes={"k": value}) as span:
        span.add_event("e", {"k": value})
        with tracer.start_as_current_span("child", links=[Link(span.get_span_context(), {"k": value})]):
            pass
    same_bytes(keep.spans)


def test_nested_values_outside_sdk_spans() -> None:
    # The SDK's attribute cleaning never lets these into a span; ReadableSpans made by hand may.
    for value in ({"a": 1, "b": ["x", {"c": None}]}, {}, None, [[1, 2], ["a"]], {1: "int key"}):
        assert _any_value(value) == _encode_value(value).SerializeToString()


def test_parents_links_trace_state_status_kinds_and_nan() -> None:
    p, keep = provider()
    tracer = p.get_tracer("pycrio", "1.2.3", schema_url="https://opentelemetry.io/schemas/1.21.0")
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "k1=v1,k2=v2"}
    remote = propagate.extract(carrier)
    with tracer.start_as_current_span("remote-child", context=remote, kind=SpanKind.SERVER) as span:
        span.set_attribute("nan", math.nan)
        for kind in SpanKind:
            with tracer.start_as_current_span(f"step {kind.name}", kind=kind) as step:
                step.add_event("no attributes")
                step.add_event("", {"x": 1}, timestamp=0)
        with tracer.start_as_current_span("error") as failing:
            failing.set_status(Status(StatusCode.ERROR, "NOT_FOUND: no such container"))
        with tracer.start_as_current_span("error without message") as failing:
            failing.set_status(Status(StatusCode.ERROR))
        with tracer.start_as_current_span("ok") as ok:
            ok.set_status(Status(StatusCode.OK))
        with tracer.start_as_current_span("unset with description") as unset:
            unset.set_status(Status(StatusCode.UNSET, "ignored by the SDK"))
    linked = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1), trace_state=TraceState([("a", "b")]))
    local = SpanContext(0x9ABC, 0xDEF0, is_remote=False)
    with tracer.start_as_current_span("links", links=[Link(linked, {"why": "follows"}), Link(local)]):
        pass
    with tracer.start_as_current_span("", context=otel_context.Context()):  # empty name, new root
        pass
    tracer.start_span("never ended")  # not exported: only the spans below
    same_bytes(keep.spans)


def test_dropped_attributes_events_and_links_are_counted() -> None:
    limits = SpanLimits(max_span_attributes=2, max_events=2, max_links=1, max_event_attributes=1, max_link_attributes=1)
    p, keep = provider(limits=limits)
    tracer = p.get_tracer("t")
    a, b = SpanContext(1, 2, False), SpanContext(3, 4, True)
    with tracer.start_as_current_span("s", links=[Link(a, {"x": 1, "y": 2}), Link(b)]) as span:
        for i in range(5):
            span.set_attribute(f"a{i}", i)
            span.add_event(f"e{i}", {"p": 1, "q": 2, "r": 3})
    span_data = keep.spans[0]
    assert (span_data.dropped_attributes, span_data.dropped_events, span_data.dropped_links) == (3, 3, 1)
    same_bytes(keep.spans)


def test_resources_and_scopes_grouped_like_the_sdk() -> None:
    p1, keep1 = provider(make_resource())
    p2, keep2 = provider(make_resource("pycrio-monitor", {"pod.id": "abc"}))
    r3 = Resource({"service.name": "other"}, schema_url="https://example.com/schema")
    p3, keep3 = provider(r3)
    p4, keep4 = provider(Resource({"service.name": "other"}, schema_url="https://example.com/schema"))  # equal to r3
    tracers = [
        p1.get_tracer("pycrio", "0.1.0"),
        p2.get_tracer("pycrio", "0.1.0"),
        p1.get_tracer("other-scope", attributes={"scope.attr": "v"}),
        p3.get_tracer("x"),
        p4.get_tracer("x"),
        p1.get_tracer("pycrio", "0.1.0"),  # the same scope as the first, another object
    ]
    for round_ in range(3):
        for tracer in tracers:
            call_span(tracer, events=round_)
    spans = sorted(keep1.spans + keep2.spans + keep3.spans + keep4.spans, key=lambda s: s.start_time or 0)
    same_bytes(spans)


def test_kept_error_copy_and_a_span_without_scope() -> None:
    p, keep = provider()
    tracer = p.get_tracer("pycrio")
    with tracer.start_as_current_span(LIST, kind=SpanKind.SERVER, attributes={"id": "x"}) as span:
        span.set_status(Status(StatusCode.ERROR, "UNKNOWN: boom"))
    kept = _as_kept(keep.spans[0])  # plain dict attributes, a ReadableSpan of its own
    bare = ReadableSpan(
        name="bare", context=SpanContext(5, 6, False), attributes={"n": 1}, resource=make_resource(), start_time=1
    )
    same_bytes([kept, bare, keep.spans[0]])


def test_what_the_encoder_refuses_goes_through_the_sdk() -> None:
    p, keep = provider()
    tracer = p.get_tracer("t")
    with tracer.start_as_current_span("s", attributes={"huge": 2**70, "fine": 1}):
        pass
    with tracer.start_as_current_span("s", attributes={"surrogate": "\udc80"}):
        pass
    for span in keep.spans:
        with pytest.raises(Unsupported):
            SpanEncoder().encode_request([span])
    exporter = FastOTLPSpanExporter(endpoint="127.0.0.1:1", insecure=True)
    try:
        assert exporter._translate_data(keep.spans) == sdk_encode(keep.spans)
    finally:
        exporter.shutdown()


def test_fast_exporter_delivers_to_a_receiver() -> None:
    with OTLPReceiver() as receiver:
        exporter = FastOTLPSpanExporter(endpoint=receiver.endpoint, insecure=True)
        p, keep = provider(make_resource())
        tracer = p.get_tracer("pycrio", "0.1.0")
        ctx = TraceContextTextMapPropagator().extract(
            {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
        )
        token = otel_context.attach(ctx)
        try:
            call_span(tracer, events=2)
        finally:
            otel_context.detach(token)
        try:
            assert exporter.export(keep.spans) is SpanExportResult.SUCCESS
        finally:
            exporter.shutdown()
        [got] = receiver.wait_for(lambda s: s.name == LIST)
    assert got.service == "pycrio"
    assert got.trace_id == "0af7651916cd43dd8448eb211c80319c" and got.parent_span_id == "b7ad6b7169203331"
    assert got.kind == 2 and got.attributes["rpc.method"] == "ListContainers" and got.attributes["rpc.grpc.status_code"] == 0
    assert [e["log.message"] for e in got.log_events()] == [
        "Request: ListContainersRequest: 0", "Request: ListContainersRequest: 1",
    ]


def test_live_sdk_span_objects() -> None:
    # A processor may hand over the SDK's Span itself rather than its ReadableSpan copy.
    p, _ = provider()
    tracer = p.get_tracer("pycrio")
    span = tracer.start_span("live", attributes={"a": 1}, links=[Link(SpanContext(7, 8, True), {"l": "x"})])
    span.add_event("log", {"log.message": "m"})
    span.set_status(Status(StatusCode.ERROR, "boom"))
    span.end()
    same_bytes([span])  # type: ignore[list-item]
