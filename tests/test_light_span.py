"""pycrio's LightTracer/LightSpan behave as the SDK's Tracer/Span: the same OTLP bytes for the same
operations, the same limits, sampling flags and refusals after end, and the daemon uses them."""

from __future__ import annotations

import itertools
import logging

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.environment_variables import OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace import Span as SDKSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from pycrio.config import TracingConfig
from pycrio.tracing import step_span
from pycrio.tracing.attributes import add_plain_event, put_attributes
from pycrio.tracing.otlp_encode import SpanEncoder, sdk_encode
from pycrio.tracing.provider import Tracing, make_resource
from pycrio.tracing.sampling import ErrorKeepingSampler
from pycrio.tracing.call_span import DeferredStepSpan
from pycrio.tracing.span import LightSpan, LightTracer, LightTracerProvider, SpanAttributes
from pycrio.tracing.span_context import SPAN_CONTEXT_TUPLE
from tests.test_otlp_encode import Keep

RESOURCE = make_resource()


class CountingIds(IdGenerator):
    """Trace and span ids 1, 2, 3...: the same ids for the same sequence of spans."""

    def __init__(self) -> None:
        self._trace = itertools.count(0x1000)
        self._span = itertools.count(0x2000)

    def generate_trace_id(self) -> int:
        return next(self._trace)

    def generate_span_id(self) -> int:
        return next(self._span)


def make(cls: type[TracerProvider], sampler: Sampler | None = None, limits: SpanLimits | None = None
         ) -> tuple[trace.Tracer, Keep]:  # fmt: skip
    keep = Keep()
    provider = cls(sampler=sampler or ALWAYS_ON, resource=RESOURCE, id_generator=CountingIds(), span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(keep))
    return provider.get_tracer("pycrio", "1.0"), keep


def a_call(tracer: trace.Tracer) -> None:
    """What a CRI call does to its spans: a server span with attributes, a step with log events,
    an exception, a renamed step, statuses, attributes of every type."""
    root = tracer.start_span("/runtime.v1.RuntimeService/RunPodSandbox", kind=SpanKind.SERVER, start_time=10,
                             attributes={"rpc.system": "grpc"})  # fmt: skip
    put_attributes(root, {"rpc.method": "RunPodSandbox", "id": "abc"}, plain=True)
    ctx = trace.set_span_in_context(root)
    step = tracer.start_span("network_setup", context=ctx, start_time=20)
    step.set_attribute("pod.ip", "10.0.0.2")
    step.set_attributes({"n": 3, "ratio": 0.5, "ok": True, "list": ["a", "b"]})
    step.add_event("log", {"log.message": "starting"}, timestamp=21)
    add_plain_event(step, "log", {"log.message": "plain", "code.lineno": 7})
    if len(step._events):  # type: ignore[attr-defined]
        step._events[-1]._timestamp = 22  # type: ignore[index] # a fixed time for comparable bytes
    try:
        raise ValueError("bad thing")
    except ValueError as exc:
        step.record_exception(exc, timestamp=23)
    step.set_status(Status(StatusCode.ERROR, "ValueError: bad thing"))
    step.update_name("network_setup_cni")
    step.end(end_time=30)
    other = tracer.start_span("mounts", context=ctx, start_time=31)
    other.set_status(StatusCode.OK)
    other.set_status(Status(StatusCode.ERROR, "ignored after OK"))
    other.end(end_time=32)
    root.set_attribute("rpc.grpc.status_code", 0)
    root.end(end_time=40)


@pytest.mark.parametrize(
    "limits",
    [None, SpanLimits(max_span_attributes=2, max_events=1, max_event_attributes=1, max_attribute_length=4),
     SpanLimits(max_events=0, max_links=0)],
    ids=["default-limits", "tight-limits", "no-events-allowed"],
)
def test_the_same_operations_give_the_same_otlp_bytes_as_the_sdk(limits: SpanLimits | None) -> None:
    sdk_tracer, sdk_spans = make(TracerProvider, limits=limits)
    light_tracer, light_spans = make(LightTracerProvider, limits=limits)
    assert type(light_tracer) is LightTracer
    a_call(sdk_tracer)
    a_call(light_tracer)
    assert all(type(s) is LightSpan for s in light_spans.spans)
    assert [s.name for s in light_spans.spans] == ["network_setup_cni", "mounts", "/runtime.v1.RuntimeService/RunPodSandbox"]
    assert sdk_encode(light_spans.spans) == sdk_encode(sdk_spans.spans)
    assert SpanEncoder().encode_request(light_spans.spans) == sdk_encode(sdk_spans.spans)
    for light, sdk in zip(light_spans.spans, sdk_spans.spans):
        assert (light.dropped_attributes, light.dropped_events, light.dropped_links) == (
            sdk.dropped_attributes, sdk.dropped_events, sdk.dropped_links)  # fmt: skip
        assert light.context == sdk.context and light.parent == sdk.parent
        assert light.status.status_code == sdk.status.status_code
    if limits is not None:
        assert light_spans.spans[0].dropped_events == 3 - (limits.max_events or 0)  # 3 events


def test_a_span_without_events_reads_as_empty_and_the_processor_gets_the_span_itself() -> None:
    tracer, keep = make(LightTracerProvider)
    span = tracer.start_span("s")
    assert span.is_recording()
    span.end()
    assert keep.spans == [span]  # no copy: an ended span cannot change
    assert span.events == () and span.links == () and span.dropped_events == 0
    assert SpanEncoder().encode_request(keep.spans) == sdk_encode(keep.spans)


@pytest.mark.parametrize("maxlen, max_value_len", [(None, None), (3, None), (0, None), (3, 4)])
def test_span_attributes_keep_drop_and_clean_as_bounded_attributes_do(maxlen: int | None, max_value_len: int | None
                                                                       ) -> None:  # fmt: skip
    initial = {"a": 1, "": "no key", "b": "longer than four", "c": [1, 2], "d": object()}
    sdk = BoundedAttributes(maxlen, initial, immutable=False, max_value_len=max_value_len)
    light = SpanAttributes(maxlen, max_value_len, initial)
    for store in (sdk, light):
        store["e"] = True
        store["a"] = 2.5  # an existing key moves to the end
        store._set_items({"f": ("x", "yyyyyy"), "g": None})
    assert list(light.items()) == list(sdk.items()) and light.dropped == sdk.dropped
    sdk._immutable = light._immutable = True
    for store in (sdk, light):
        with pytest.raises(TypeError):
            store["h"] = 1
    assert isinstance(light, BoundedAttributes)  # what the SDK's dropped_attributes checks
    assert "_lock" not in vars(light)  # the span's lock guards it: no lock of its own


def test_a_light_spans_attributes_count_their_drops_for_the_sdks_readers() -> None:
    tracer, keep = make(LightTracerProvider, limits=SpanLimits(max_span_attributes=2))
    span = tracer.start_span("s", attributes={"a": 1, "b": 2})
    span.set_attribute("c", 3)
    span.set_attributes({"d": 4, "e": 5})
    span.end()
    assert type(span._attributes) is SpanAttributes
    assert dict(span.attributes or {}) == {"d": 4, "e": 5} and span.dropped_attributes == 3
    assert SpanEncoder().encode_request(keep.spans) == sdk_encode(keep.spans)


def test_an_ended_span_refuses_changes_as_the_sdk_does(caplog: pytest.LogCaptureFixture) -> None:
    tracer, keep = make(LightTracerProvider)
    span = tracer.start_span("s", attributes={"a": 1})
    span.end(end_time=5)
    with caplog.at_level(logging.WARNING, logger="opentelemetry.sdk.trace"):
        span.set_attribute("b", 2)
        span.add_event("late")
        add_plain_event(span, "late", {"x": 1})
        span.set_status(Status(StatusCode.ERROR, "late"))
        span.update_name("renamed")
        span.end(end_time=9)
    assert dict(span.attributes or {}) == {"a": 1}
    assert span.events == () and span.name == "s" and span.end_time == 5
    assert span.status.status_code is StatusCode.UNSET
    assert not span.is_recording()
    assert len(keep.spans) == 1
    assert "ended span" in caplog.text


@pytest.mark.parametrize(
    "sampler, parent_flags",
    [(ALWAYS_ON, None), (ALWAYS_OFF, None), (ParentBased(ALWAYS_OFF), 0x01), (ParentBased(ALWAYS_ON), 0x00),
     (ParentBased(ALWAYS_ON), 0x03), (ErrorKeepingSampler(ParentBased(ALWAYS_OFF)), None)],
    ids=["on", "off", "sampled-parent", "unsampled-parent", "random-parent", "record-only"],
)
def test_sampling_decisions_and_flags_match_the_sdk(sampler: Sampler, parent_flags: int | None) -> None:
    context = None
    if parent_flags is not None:
        parent = SpanContext(0xAB, 0xCD, is_remote=True, trace_flags=TraceFlags(parent_flags))
        context = trace.set_span_in_context(NonRecordingSpan(parent))
    results = []
    for cls in (TracerProvider, LightTracerProvider):
        tracer, keep = make(cls, sampler=sampler)
        span = tracer.start_span("/runtime.v1.RuntimeService/Version", context=context, kind=SpanKind.SERVER)
        span.end()
        results.append((isinstance(span, NonRecordingSpan), span.is_recording(), span.get_span_context(), len(keep.spans)))
    assert results[0] == results[1]


def test_the_pinned_sdks_span_context_is_read_by_unpacking() -> None:
    """The hot paths unpack a SpanContext instead of calling its properties, and make one without
    its constructor; with the pinned API they do (another layout takes the properties and the
    constructor: slower, not wrong)."""
    assert SPAN_CONTEXT_TUPLE


def test_an_invalid_parent_starts_a_new_trace_as_the_sdks_tracer_does() -> None:
    context = trace.set_span_in_context(NonRecordingSpan(SpanContext(0, 0, is_remote=True)))
    for cls in (TracerProvider, LightTracerProvider):
        tracer, keep = make(cls, sampler=ParentBased(ALWAYS_ON))
        span = tracer.start_span("s", context=context)
        span.end()
        assert span.parent is None and span.get_span_context().is_valid and span.get_span_context().trace_flags.sampled
        assert len(keep.spans) == 1


def test_links_and_the_sdks_internal_metrics_take_the_sdks_own_path(monkeypatch: pytest.MonkeyPatch) -> None:
    tracer, _ = make(LightTracerProvider)
    linked = tracer.start_span("s", links=[Link(SpanContext(1, 2, is_remote=True))])
    assert type(linked) is not LightSpan and isinstance(linked, SDKSpan) and len(linked.links) == 1
    monkeypatch.setenv(OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED, "true")
    tracer, _ = make(LightTracerProvider)
    assert type(tracer.start_span("s")) is not LightSpan


def test_a_link_added_later_is_kept_and_encoded() -> None:
    tracer, keep = make(LightTracerProvider)
    span = tracer.start_span("s")
    span.add_link(SpanContext(5, 6, is_remote=True), {"k": "v"})
    span.end()
    assert len(span.links) == 1 and span.links[0].context.span_id == 6
    assert SpanEncoder().encode_request(keep.spans) == sdk_encode(keep.spans)


def test_the_daemons_call_and_step_spans_are_light_spans() -> None:
    tracing = Tracing(TracingConfig(enable_tracing=True, tracing_endpoint="127.0.0.1:1",
                                    tracing_sampling_rate_per_million=1_000_000))  # fmt: skip
    try:
        call = tracing.tracer.start_span("/runtime.v1.RuntimeService/Version", kind=SpanKind.SERVER)
        assert type(call) is LightSpan
        token = otel_context.attach(trace.set_span_in_context(call))
        try:
            with step_span("a_step", n=1) as step:
                assert type(step) is DeferredStepSpan  # made after the step unless used: here, at once
                assert type(step.made()) is LightSpan
                assert step.parent is not None and step.parent.span_id == call.get_span_context().span_id
        finally:
            otel_context.detach(token)
        call.end()
    finally:
        tracing.shutdown(1.0)

