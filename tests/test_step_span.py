"""Step spans made after their steps (pycrio.tracing.step_span over call_span.DeferredStepSpan):
on a real in-process gRPC server with the daemon's Tracing and interceptor, exported to a real
OTLP/gRPC receiver. A step that leaves its span alone gets, after the step, the span its thread
would have made (same parent, times, attributes, including those set during the step); a step
whose span is used (a log line, a nested step, an error) gets it during the step."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import pytest
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from pycrio.cri import api_pb2, api_pb2_grpc
from pycrio.tracing import child_span, step_span
from pycrio.tracing.call_span import USED_IN_A_ROW, DeferredStepSpan
from pycrio.tracing.provider import STEP_SPANS_ENV
from pycrio.tracing.span import LightSpan
from tests.otlp_receiver import OTLPReceiver, ReceivedSpan
from tests import test_call_span
from tests.test_call_span import PARENT_ID, TRACE_ID, Served, deferred_waiting, ended_after_reload, flushed

serve = test_call_span.serve  # the fixture: a served Tracing to the receiver
log = logging.getLogger("pycrio.test.step_span")
INTERNAL, CLIENT = 1, 3  # OTLP's SPAN_KIND_INTERNAL, SPAN_KIND_CLIENT


class StepServicer(api_pb2_grpc.RuntimeServiceServicer):
    """Handlers that each take steps of one kind; `seen` holds the step spans as the steps saw them."""

    def __init__(self) -> None:
        self.seen: list[trace.Span] = []
        self.outgoing: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def ListContainers(self, request, context):  # noqa: N802 - gRPC names
        with step_span("runtime_create", **{"container.id": "c1"}) as span:
            self.seen.append(span)
            span.set_attribute("pycrio.test.pid", 42)  # kept for the real span, not a use
            span.set_attributes({"pycrio.test.note": "set during the step"})
        return api_pb2.ListContainersResponse()

    def Version(self, request, context):  # noqa: N802
        with step_span("cni_add", **{"pod.id": "p1"}) as span:
            self.seen.append(span)
            log.info("inside the step")
        return api_pb2.VersionResponse(version="0.1.0")

    def ContainerStatus(self, request, context):  # noqa: N802
        with step_span("outer") as outer, step_span("inner", depth=2) as inner:
            self.seen += [outer, inner]
        return api_pb2.ContainerStatusResponse()

    def PodSandboxStatus(self, request, context):  # noqa: N802
        try:
            with step_span("failing", **{"pod.id": "p2"}) as span:
                self.seen.append(span)
                raise ValueError("boom")
        except ValueError:
            pass
        return api_pb2.PodSandboxStatusResponse()

    def Status(self, request, context):  # noqa: N802
        with child_span("pycrio-monitor-client: Create", SpanKind.CLIENT, {"pod.id": "p3"}) as span:
            self.seen.append(span)
        return api_pb2.StatusResponse()

    def ExecSync(self, request, context):  # noqa: N802
        with step_span("exec_in_monitor") as span:
            self.seen.append(span)
            carrier: dict[str, str] = {}
            propagate.inject(carrier)  # an outgoing call from the step: its traceparent needs the real span
            self.outgoing.append(carrier["traceparent"])
        return api_pb2.ExecSyncResponse()

    def RemoveContainer(self, request, context):  # noqa: N802
        with step_span("runtime_delete") as span:
            self.seen.append(span)
            log.error("runc delete failed")
        return api_pb2.RemoveContainerResponse()

    def UpdateRuntimeConfig(self, request, context):  # noqa: N802
        with step_span("across_reload") as span:
            self.seen.append(span)
            self.entered.set()
            assert self.release.wait(10)
        return api_pb2.UpdateRuntimeConfigResponse()


def by_name(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.name: s for s in spans}


def test_a_step_that_leaves_its_span_alone_gets_it_after_the_step_as_its_thread_would_make_it(
    serve: Callable[..., Served], receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: dict[str, ReceivedSpan] = {}
    calls: dict[str, ReceivedSpan] = {}
    windows: dict[str, tuple[int, int]] = {}
    for how in ("deferred", "eager"):
        if how == "eager":
            monkeypatch.setenv(STEP_SPANS_ENV, "eager")
        served = serve(receiver, servicer=StepServicer())
        before = time.time_ns()
        served.call("ListContainers", api_pb2.ListContainersRequest())
        windows[how] = (before, time.time_ns())
        seen = served.servicer.seen[-1]
        assert type(seen) is (DeferredStepSpan if how == "deferred" else LightSpan)
        # The step's span and its call's wait for the export thread (an eager step makes its parent).
        assert deferred_waiting(served) == (2 if how == "deferred" else 0)
        spans = by_name(flushed(served, receiver, 2))
        steps[how], calls[how] = spans["runtime_create"], spans["/runtime.v1.RuntimeService/ListContainers"]
        assert served.tracing.health.snapshot()["spans_started"] == 2
        receiver.clear()
        served.tracing.shutdown(5.0)
        served.close()
    for how in ("deferred", "eager"):
        step, call = steps[how], calls[how]
        assert step.kind == INTERNAL and step.trace_id == call.trace_id == TRACE_ID
        assert step.parent_span_id == call.span_id and call.parent_span_id == PARENT_ID
        start, end = windows[how]
        assert start <= call.start_ns <= step.start_ns <= step.end_ns <= call.end_ns <= end
        assert step.status_code == 0 and step.events == []
        assert step.attributes == {
            "container.id": "c1",
            "pycrio.test.pid": 42,
            "pycrio.test.note": "set during the step",
        }


def test_a_log_line_in_a_step_is_kept_for_its_span_and_lands_on_it(
    serve: Callable[..., Served], receiver: OTLPReceiver
) -> None:
    served = serve(receiver, servicer=StepServicer())
    served.call("Version", api_pb2.VersionRequest())
    assert type(step_seen := served.servicer.seen[-1]) is DeferredStepSpan and step_seen._real is None
    assert deferred_waiting(served) == 2  # the step's and the call's, made after them
    spans = by_name(flushed(served, receiver, 2))
    step, call = spans["cni_add"], spans["/runtime.v1.RuntimeService/Version"]
    assert [e[1]["log.message"] for e in step.events if e[0] == "log"] == ["inside the step"]
    assert step.start_ns <= step.event_times[0] <= step.end_ns
    assert call.events == [] and step.parent_span_id == call.span_id
    assert step.attributes["pod.id"] == "p1" and step.status_code == 0


def test_an_error_log_line_in_a_step_sets_its_span_s_status(serve: Callable[..., Served], receiver: OTLPReceiver) -> None:
    served = serve(receiver, servicer=StepServicer())
    served.call("RemoveContainer", api_pb2.RemoveContainerRequest(container_id="c1"))
    assert deferred_waiting(served) == 2
    spans = by_name(flushed(served, receiver, 2))
    step, call = spans["runtime_delete"], spans["/runtime.v1.RuntimeService/RemoveContainer"]
    assert (step.status_code, step.status_message) == (2, "runc delete failed")
    assert [e["log.severity"] for e in step.log_events()] == ["ERROR"] and call.status_code == 0


def test_nested_steps_chain_their_parents(serve: Callable[..., Served], receiver: OTLPReceiver) -> None:
    served = serve(receiver, servicer=StepServicer())
    served.call("ContainerStatus", api_pb2.ContainerStatusRequest(container_id="c1"))
    outer_seen, inner_seen = served.servicer.seen[-2:]
    assert type(outer_seen) is type(inner_seen) is DeferredStepSpan
    assert deferred_waiting(served) == 3  # the inner one, the outer one and the call, made after them
    spans = by_name(flushed(served, receiver, 3))
    call, outer, inner = spans["/runtime.v1.RuntimeService/ContainerStatus"], spans["outer"], spans["inner"]
    assert inner.parent_span_id == outer.span_id and outer.parent_span_id == call.span_id
    assert outer.start_ns <= inner.start_ns <= inner.end_ns <= outer.end_ns
    assert inner.attributes == {"depth": 2}


def test_an_error_escaping_a_step_is_recorded_on_its_span(serve: Callable[..., Served], receiver: OTLPReceiver) -> None:
    served = serve(receiver, servicer=StepServicer())
    served.call("PodSandboxStatus", api_pb2.PodSandboxStatusRequest(pod_sandbox_id="p2"))
    spans = by_name(flushed(served, receiver, 2))
    step, call = spans["failing"], spans["/runtime.v1.RuntimeService/PodSandboxStatus"]
    assert step.status_code == 2 and step.status_message == "ValueError: boom"
    assert [name for name, _ in step.events] == ["exception"]
    assert step.events[0][1]["exception.type"] == "ValueError" and step.events[0][1]["exception.message"] == "boom"
    assert step.attributes == {"pod.id": "p2"} and step.parent_span_id == call.span_id
    assert call.status_code == 0  # the handler caught it


def test_a_step_whose_spans_are_used_gets_them_at_the_start(serve: Callable[..., Served], receiver: OTLPReceiver) -> None:
    served = serve(receiver, servicer=StepServicer())
    deferred = served.tracing.deferred_spans
    assert deferred is not None
    for _ in range(USED_IN_A_ROW):
        served.call("ExecSync", api_pb2.ExecSyncRequest())  # the step calls out: its span is used
        assert type(served.servicer.seen[-1]) is DeferredStepSpan
        served.call("Version", api_pb2.VersionRequest())  # another step, which logs: no use
    assert "exec_in_monitor" in deferred.eager_methods and "cni_add" not in deferred.eager_methods
    served.call("ExecSync", api_pb2.ExecSyncRequest())
    assert type(served.servicer.seen[-1]) is LightSpan  # made at the start
    served.call("Version", api_pb2.VersionRequest())
    assert type(served.servicer.seen[-1]) is DeferredStepSpan
    spans = flushed(served, receiver, 4 * (USED_IN_A_ROW + 1))
    sent = {f"00-{s.trace_id}-{s.span_id}-01" for s in spans if s.name == "exec_in_monitor"}
    assert len(sent) == USED_IN_A_ROW + 1 and set(served.servicer.outgoing) == sent
    assert [len(s.log_events()) for s in spans if s.name == "cni_add"] == [1] * (USED_IN_A_ROW + 1)


def test_a_client_span_is_made_at_once_for_its_context_to_travel(
    serve: Callable[..., Served], receiver: OTLPReceiver
) -> None:
    served = serve(receiver, servicer=StepServicer())
    served.call("Status", api_pb2.StatusRequest())
    assert type(served.servicer.seen[-1]) is LightSpan and deferred_waiting(served) == 0
    spans = by_name(flushed(served, receiver, 2))
    client, call = spans["pycrio-monitor-client: Create"], spans["/runtime.v1.RuntimeService/Status"]
    assert client.kind == CLIENT and client.parent_span_id == call.span_id


def test_a_step_the_queue_refuses_is_made_and_ended_on_its_thread(
    serve: Callable[..., Served], receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = serve(receiver, servicer=StepServicer())
    pipeline = served.tracing.pipeline
    assert pipeline is not None
    # Full or shutting down (when defer refuses is test_span_batcher's): the step's thread makes it.
    monkeypatch.setattr(pipeline.batch, "defer", lambda span: False)
    served.call("ListContainers", api_pb2.ListContainersRequest())
    seen = served.servicer.seen[-1]
    assert type(seen) is DeferredStepSpan and type(seen._real) is LightSpan
    assert deferred_waiting(served) == 0
    spans = by_name(flushed(served, receiver, 2))
    step, call = spans["runtime_create"], spans["/runtime.v1.RuntimeService/ListContainers"]
    assert step.parent_span_id == call.span_id and step.attributes["pycrio.test.pid"] == 42
    assert served.tracing.health.snapshot()["spans_started"] == 2


def test_a_step_in_flight_across_a_reload_ends_in_the_new_pipeline(
    serve: Callable[..., Served], receiver: OTLPReceiver
) -> None:
    served = serve(receiver, servicer=StepServicer())
    pending = served.stub.UpdateRuntimeConfig.future(
        api_pb2.UpdateRuntimeConfigRequest(), metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),), timeout=10
    )
    step = ended_after_reload(served, pending)[0]
    assert step.name == "across_reload" and step.trace_id == TRACE_ID and step.kind == INTERNAL
