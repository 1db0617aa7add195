"""Call spans made after their calls (pycrio.tracing.call_span): on a real in-process gRPC server
with the daemon's Tracing and interceptor, exported to a real OTLP/gRPC receiver. The span a call
gets is the one the call's thread would have made; a call that uses its span gets it at once;
flush, shutdown, reload, errors kept and a use from another thread lose nothing and make one span."""

from __future__ import annotations

import contextvars
import io
import logging
import threading
import time
from concurrent import futures
from typing import Any, Callable, Iterator

import grpc
import pytest
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

import pycrio.tracing
from pycrio.config import TracingConfig
from pycrio.cri import api_pb2, api_pb2_grpc
from pycrio.errors import NotFound
from pycrio.log import LogfmtFormatter
from pycrio.tracing import CRIServerInterceptor, step_span
from pycrio.tracing import provider as provider_module
from pycrio.tracing.attributes import put_attributes
from pycrio.tracing.call_span import USED_IN_A_ROW, DeferredCallSpan
from pycrio.tracing.logs import SpanEventHandler
from pycrio.tracing.pipeline import CALL_SPANS_ENV
from pycrio.tracing.provider import SPANS_ENV, RETIRE_THREAD, Tracing
from pycrio.tracing.span import LightSpan
from tests.otlp_receiver import OTLPReceiver, ReceivedSpan

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-01"
UNSAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-00"
LIST = "/runtime.v1.RuntimeService/ListContainers"
log = logging.getLogger("pycrio.test.call_span")


class Servicer(api_pb2_grpc.RuntimeServiceServicer):
    """Handlers that leave their span alone, log, fail, take a step, or keep their context."""

    def __init__(self) -> None:
        self.seen: list[trace.Span] = []  # the current span as each handler found it
        self.contexts: list[contextvars.Context] = []
        self.outgoing: list[str] = []  # the traceparents ExecSync sent on

    def ListContainers(self, request, context):  # noqa: N802 - gRPC names
        self.seen.append(trace.get_current_span())
        return api_pb2.ListContainersResponse()

    def Version(self, request, context):  # noqa: N802
        if request.version != "quiet":
            log.info("asked for the version")
        self.seen.append(trace.get_current_span())
        return api_pb2.VersionResponse(version="0.1.0")

    def PodSandboxStatus(self, request, context):  # noqa: N802
        raise NotFound(f"pod sandbox {request.pod_sandbox_id!r} not found")

    def ContainerStatus(self, request, context):  # noqa: N802
        self.seen.append(trace.get_current_span())
        with step_span("read_state", container_id=request.container_id):
            pass
        return api_pb2.ContainerStatusResponse()

    def ListPodSandbox(self, request, context):  # noqa: N802
        self.contexts.append(contextvars.copy_context())  # e.g. a thread the call starts
        return api_pb2.ListPodSandboxResponse()

    def UpdateRuntimeConfig(self, request, context):  # noqa: N802
        self.entered.set()
        assert self.release.wait(10)
        return api_pb2.UpdateRuntimeConfigResponse()

    def Status(self, request, context):  # noqa: N802
        put_attributes(trace.get_current_span(), {"pycrio.test.note": "set through the stand-in"})
        return api_pb2.StatusResponse()

    def RemoveContainer(self, request, context):  # noqa: N802
        log.error("could not remove %s", request.container_id)  # the call goes on, its span is ERROR
        return api_pb2.RemoveContainerResponse()

    def ExecSync(self, request, context):  # noqa: N802
        self.seen.append(trace.get_current_span())
        if list(request.cmd) != ["quiet"]:  # an outgoing call: its traceparent needs the real span
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            self.outgoing.append(carrier["traceparent"])
        return api_pb2.ExecSyncResponse()

    entered = threading.Event()
    release = threading.Event()


class Served:
    """A gRPC server with the interceptor over `tracing`, and a stub to it."""

    def __init__(self, tracing: Tracing, servicer: Any = None) -> None:
        self.tracing = tracing
        self.servicer = servicer if servicer is not None else Servicer()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2), interceptors=[CRIServerInterceptor(tracing)]
        )
        api_pb2_grpc.add_RuntimeServiceServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = api_pb2_grpc.RuntimeServiceStub(self.channel)

    def call(self, name: str, request: Any, traceparent: str | None = SAMPLED) -> Any:
        metadata = (("traceparent", traceparent),) if traceparent else ()
        return getattr(self.stub, name)(request, metadata=metadata, timeout=10)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch, receiver: OTLPReceiver) -> Iterator[Callable[..., Served]]:
    """Served daemons' Tracing to `receiver`; nothing is exported until a flush (1 h batch delay).
    (It asks for the receiver fixture so that the receiver outlives the daemons' last export.)"""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "3600000")
    # The process's global provider is set once: step spans come from this Tracing's tracer.
    monkeypatch.setattr(provider_module.trace, "set_tracer_provider", lambda provider: None)
    handler = SpanEventHandler()
    logging.getLogger().addHandler(handler)
    previous_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    made: list[Served] = []

    def factory(receiver: OTLPReceiver, rate: int = 0, keep_errors: bool = False, servicer: Any = None) -> Served:
        tracing = Tracing(TracingConfig(enable_tracing=True, tracing_endpoint=receiver.endpoint,
                                        tracing_sampling_rate_per_million=rate,
                                        tracing_always_sample_errors=keep_errors))  # fmt: skip
        monkeypatch.setattr(pycrio.tracing, "_STEP_TRACER", tracing.tracer)
        served = Served(tracing, servicer)
        made.append(served)
        return served

    try:
        yield factory
    finally:
        for served in made:
            served.tracing.shutdown(5.0)
            served.close()
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(previous_level)


def flushed(served: Served, receiver: OTLPReceiver, count: int) -> list[ReceivedSpan]:
    assert served.tracing.pipeline is not None
    assert served.tracing.pipeline.processor.force_flush()
    assert len(receiver.wait_for(lambda s: True, count=count, timeout=10)) >= count, receiver.spans()
    return receiver.spans()


def ended_after_reload(served: Served, pending: Any) -> list[ReceivedSpan]:
    """Reloads to a new receiver while the servicer blocks, lets the call end; the spans it got."""
    assert served.servicer.entered.wait(10)
    other = OTLPReceiver().start()
    try:
        served.tracing.apply(TracingConfig(enable_tracing=True, tracing_endpoint=other.endpoint))
        for thread in threading.enumerate():  # the old pipeline is shut down before the call ends
            if thread.name == RETIRE_THREAD:
                thread.join(10)
        served.servicer.release.set()
        pending.result(10)
        return flushed(served, other, 1)
    finally:
        other.stop()


def deferred_waiting(served: Served) -> int:
    assert served.tracing.pipeline is not None
    return len(served.tracing.pipeline.batch._deferred)


def test_a_call_that_leaves_its_span_alone_gets_it_after_the_call_as_its_thread_would_make_it(
    serve: Callable[..., Served], receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans: dict[str, ReceivedSpan] = {}
    windows: dict[str, tuple[int, int]] = {}
    for how in ("deferred", "eager"):
        if how == "eager":
            monkeypatch.setenv(CALL_SPANS_ENV, "eager")
        served = serve(receiver)
        before = time.time_ns()
        served.call("ListContainers", api_pb2.ListContainersRequest())
        windows[how] = (before, time.time_ns())
        # During the call its current span was the stand-in (deferred) or the real span (eager);
        # afterwards a deferred span waits for the export thread, made by no one yet.
        current = served.servicer.seen[-1]
        assert type(current) is (DeferredCallSpan if how == "deferred" else LightSpan)
        assert deferred_waiting(served) == (1 if how == "deferred" else 0)
        spans[how] = flushed(served, receiver, 1)[0]
        receiver.clear()
        served.tracing.shutdown(5.0)
        served.close()
    deferred, eager = spans["deferred"], spans["eager"]
    for span, how in ((deferred, "deferred"), (eager, "eager")):
        assert span.name == LIST and span.kind == SpanKind.SERVER.value + 1  # OTLP's SPAN_KIND_SERVER
        assert span.trace_id == TRACE_ID and span.parent_span_id == PARENT_ID
        start, end = windows[how]
        assert start <= span.start_ns <= span.end_ns <= end
        assert span.status_code == 0 and span.events == []
    assert {k: v for k, v in deferred.attributes.items() if k != "id"} == {
        k: v for k, v in eager.attributes.items() if k != "id"
    }
    assert deferred.attributes["rpc.grpc.status_code"] == 0 and deferred.attributes["rpc.method"] == "ListContainers"
    assert len(deferred.attributes["id"]) == 36 and deferred.span_id != eager.span_id


def test_a_failing_call_gets_its_error_status_after_the_call(serve: Callable[..., Served], receiver: OTLPReceiver) -> None:
    served = serve(receiver)
    with pytest.raises(grpc.RpcError) as failed:
        served.call("PodSandboxStatus", api_pb2.PodSandboxStatusRequest(pod_sandbox_id="p1"))
    assert failed.value.code() is grpc.StatusCode.NOT_FOUND
    assert deferred_waiting(served) == 1
    span = flushed(served, receiver, 1)[0]
    assert span.status_code == 2 and span.status_message == "NOT_FOUND: pod sandbox 'p1' not found"
    assert span.attributes["rpc.grpc.status_code"] == 5
    assert span.attributes["rpc.response.status_code"] == "NOT_FOUND"


def test_a_call_that_logs_or_takes_a_step_keeps_them_for_its_span_made_after_it(
    serve: Callable[..., Served], receiver: OTLPReceiver
) -> None:
    served = serve(receiver)
    before = time.time_ns()
    served.call("Version", api_pb2.VersionRequest())
    after = time.time_ns()
    # The log line's event waits in the stand-in for the span made after the call.
    assert type(served.servicer.seen[-1]) is DeferredCallSpan and deferred_waiting(served) == 1
    served.call("ContainerStatus", api_pb2.ContainerStatusRequest(container_id="c1"))
    assert type(served.servicer.seen[-1]) is DeferredCallSpan
    assert deferred_waiting(served) == 3  # the step's span, and its call's, made after them
    by_name = {s.name: s for s in flushed(served, receiver, 3)}
    version = by_name["/runtime.v1.RuntimeService/Version"]
    assert [name for name, _ in version.events] == ["log"]
    assert version.events[0][1]["log.message"] == "asked for the version"
    assert version.events[0][1]["log.severity"] == "INFO"
    assert version.events[0][1]["id"] == version.attributes["id"]
    assert before <= version.start_ns <= version.event_times[0] <= version.end_ns <= after
    status = by_name["/runtime.v1.RuntimeService/ContainerStatus"]
    step = by_name["read_state"]
    assert step.parent_span_id == status.span_id and step.trace_id == status.trace_id == TRACE_ID
    assert step.attributes["container_id"] == "c1"
    assert status.parent_span_id == PARENT_ID


def test_root_calls_start_their_own_traces(serve: Callable[..., Served], receiver: OTLPReceiver) -> None:
    served = serve(receiver, rate=1_000_000)
    for _ in range(2):
        served.call("ListContainers", api_pb2.ListContainersRequest(), traceparent=None)
    assert deferred_waiting(served) == 2
    first, second = flushed(served, receiver, 2)
    assert first.parent_span_id == "" and second.parent_span_id == ""
    assert first.trace_id != second.trace_id and TRACE_ID not in (first.trace_id, second.trace_id)


def test_an_unsampled_caller_is_not_exported_but_its_errors_are_kept(
    serve: Callable[..., Served], receiver: OTLPReceiver
) -> None:
    served = serve(receiver, keep_errors=True)
    served.call("ListContainers", api_pb2.ListContainersRequest(), traceparent=UNSAMPLED)
    with pytest.raises(grpc.RpcError):
        served.call("PodSandboxStatus", api_pb2.PodSandboxStatusRequest(pod_sandbox_id="p2"), traceparent=UNSAMPLED)
    spans = flushed(served, receiver, 1)
    time.sleep(0.3)
    spans = receiver.spans()
    assert [s.name for s in spans] == ["/runtime.v1.RuntimeService/PodSandboxStatus"]
    assert spans[0].attributes["pycrio.sampling.kept_for_error"] is True
    assert spans[0].parent_span_id == PARENT_ID
    health = served.tracing.health.snapshot()
    assert health["spans_kept_for_error"] == 1 and health["spans_started"] == 0


def test_shutdown_exports_the_spans_still_to_be_made(serve: Callable[..., Served], receiver: OTLPReceiver) -> None:
    served = serve(receiver)
    for _ in range(5):
        served.call("ListContainers", api_pb2.ListContainersRequest())
    assert deferred_waiting(served) == 5
    health = served.tracing.health
    assert served.tracing.shutdown(5.0)
    assert receiver.wait_for(lambda s: s.name == LIST, count=5, timeout=10)
    counters = health.snapshot()
    assert counters["spans_started"] == counters["spans_exported"] == 5


def test_a_call_before_a_reload_is_exported_by_the_pipeline_it_started_under(
    serve: Callable[..., Served], receiver: OTLPReceiver
) -> None:
    served = serve(receiver)
    served.call("ListContainers", api_pb2.ListContainersRequest())
    other = OTLPReceiver().start()
    try:
        served.tracing.apply(TracingConfig(enable_tracing=True, tracing_endpoint=other.endpoint))
        served.call("ListPodSandbox", api_pb2.ListPodSandboxRequest())
        assert receiver.wait_for(lambda s: s.name == LIST, count=1, timeout=10)  # the old pipeline's flush
        flushed(served, other, 1)
        assert [s.name for s in other.spans()] == ["/runtime.v1.RuntimeService/ListPodSandbox"]
        assert [s.name for s in receiver.spans()] == [LIST]
    finally:
        other.stop()


def test_a_use_after_the_call_from_other_threads_makes_exactly_one_span(
    serve: Callable[..., Served], receiver: OTLPReceiver
) -> None:
    served = serve(receiver)
    served.call("ListPodSandbox", api_pb2.ListPodSandboxRequest())
    context = served.servicer.contexts[-1]
    seen: list[int] = []
    go = threading.Barrier(5)

    def use() -> None:
        go.wait()
        seen.append(context.run(lambda: trace.get_current_span().get_span_context().span_id))

    def flush() -> None:
        go.wait()
        assert served.tracing.pipeline is not None
        served.tracing.pipeline.processor.force_flush()

    threads = [threading.Thread(target=use) for _ in range(4)] + [threading.Thread(target=flush)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    spans = flushed(served, receiver, 1)
    time.sleep(0.3)
    spans = receiver.spans()
    assert len(spans) == 1, spans
    assert len(set(seen)) == 1 and f"{seen[0]:016x}" == spans[0].span_id
    assert served.tracing.health.snapshot()["spans_started"] == 1


def test_a_log_line_while_the_span_is_being_made_neither_recurses_nor_is_lost_from_the_call(
    serve: Callable[..., Served], receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = serve(receiver)
    pipeline = served.tracing.pipeline
    assert pipeline is not None
    deciding = pipeline.sampler.should_sample

    def logging_sampler(*args: Any, **kwargs: Any) -> Any:
        log.info("sampler deciding")  # looks for the current span: the one being made
        return deciding(*args, **kwargs)

    monkeypatch.setattr(pipeline.sampler, "should_sample", logging_sampler)
    served.call("Version", api_pb2.VersionRequest())  # its log line makes the span during the call
    served.call("ListContainers", api_pb2.ListContainersRequest())  # made after the call
    by_name = {s.name: s for s in flushed(served, receiver, 2)}
    assert [e[1]["log.message"] for e in by_name["/runtime.v1.RuntimeService/Version"].events] == [
        "asked for the version"
    ]
    assert by_name[LIST].events == [] and by_name[LIST].parent_span_id == PARENT_ID


def test_a_call_in_flight_across_a_reload_ends_in_the_new_pipeline(
    serve: Callable[..., Served], receiver: OTLPReceiver
) -> None:
    served = serve(receiver)
    servicer = served.servicer
    servicer.entered, servicer.release = threading.Event(), threading.Event()
    pending = served.stub.UpdateRuntimeConfig.future(
        api_pb2.UpdateRuntimeConfigRequest(), metadata=(("traceparent", SAMPLED),), timeout=10
    )
    spans = ended_after_reload(served, pending)
    assert [s.name for s in spans] == ["/runtime.v1.RuntimeService/UpdateRuntimeConfig"]
    assert spans[0].parent_span_id == PARENT_ID


def test_sdk_fields_reach_the_real_span_through_the_stand_in(serve: Callable[..., Served], receiver: OTLPReceiver) -> None:
    served = serve(receiver)
    served.call("Status", api_pb2.StatusRequest())
    span = flushed(served, receiver, 1)[0]
    assert span.attributes["pycrio.test.note"] == "set through the stand-in"
    assert span.attributes["rpc.method"] == "Status"


def test_the_sdks_own_spans_and_eager_make_every_span_during_the_call(
    serve: Callable[..., Served], receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ((SPANS_ENV, "sdk"), (CALL_SPANS_ENV, "eager")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            served = serve(receiver)
            assert served.tracing.deferred_spans is None
            served.call("ListContainers", api_pb2.ListContainersRequest())
            assert deferred_waiting(served) == 0 and type(served.servicer.seen[-1]) is not DeferredCallSpan


def test_a_log_line_prints_the_ids_its_span_made_after_the_call_gets(
    serve: Callable[..., Served], receiver: OTLPReceiver
) -> None:
    served = serve(receiver)
    out = io.StringIO()
    printer = logging.StreamHandler(out)
    printer.setFormatter(LogfmtFormatter())
    logging.getLogger().addHandler(printer)
    try:
        served.call("Version", api_pb2.VersionRequest())
        served.call("ContainerStatus", api_pb2.ContainerStatusRequest(container_id="c1"))
    finally:
        logging.getLogger().removeHandler(printer)
    assert deferred_waiting(served) == 3  # no span was made for the line's ids
    line = next(line for line in out.getvalue().splitlines() if "asked for the version" in line)
    version = flushed(served, receiver, 3)[0]
    assert version.name == "/runtime.v1.RuntimeService/Version"
    assert f"trace_id={TRACE_ID} span_id={version.span_id}" in line and f"id={version.attributes['id']}" in line


def test_an_error_log_line_sets_the_status_of_the_span_made_after_the_call(
    serve: Callable[..., Served], receiver: OTLPReceiver
) -> None:
    served = serve(receiver, keep_errors=True)
    served.call("RemoveContainer", api_pb2.RemoveContainerRequest(container_id="c9"))
    served.call("RemoveContainer", api_pb2.RemoveContainerRequest(container_id="c8"), traceparent=UNSAMPLED)
    # The sampled caller's span records for sure: made after the call; the unsampled one's only
    # the sampler knows: it was made at the log line.
    assert deferred_waiting(served) == 1
    spans = sorted(flushed(served, receiver, 2), key=lambda s: s.status_message, reverse=True)
    assert [(s.status_code, s.status_message) for s in spans] == [(2, "could not remove c9"), (2, "could not remove c8")]
    assert [e["log.severity"] for s in spans for e in s.log_events()] == ["ERROR", "ERROR"]
    # The unsampled caller's call is exported for its error, as one made during the call is.
    assert "pycrio.sampling.kept_for_error" not in spans[0].attributes
    assert spans[1].attributes["pycrio.sampling.kept_for_error"] is True


def test_an_outgoing_call_makes_the_span_during_the_call_for_its_traceparent(
    serve: Callable[..., Served], receiver: OTLPReceiver
) -> None:
    served = serve(receiver)
    served.call("ExecSync", api_pb2.ExecSyncRequest(container_id="c1", cmd=["true"]))
    assert type(trace_seen := served.servicer.seen[-1]) is DeferredCallSpan and trace_seen._real is not None
    assert deferred_waiting(served) == 0  # made during the call, ended by it
    span = flushed(served, receiver, 1)[0]
    assert served.servicer.outgoing == [f"00-{TRACE_ID}-{span.span_id}-01"]
    assert span.parent_span_id == PARENT_ID


def test_a_method_whose_calls_use_their_spans_gets_them_at_the_start(
    serve: Callable[..., Served], receiver: OTLPReceiver
) -> None:
    served = serve(receiver)
    deferred = served.tracing.deferred_spans
    assert deferred is not None
    execs = "/runtime.v1.RuntimeService/ExecSync"
    for i in range(USED_IN_A_ROW):
        served.call("ListContainers", api_pb2.ListContainersRequest())
        served.call("ContainerStatus", api_pb2.ContainerStatusRequest(container_id=f"c{i}"))  # a step: no use
        served.call("Version", api_pb2.VersionRequest())  # a log line: no use
        served.call("ExecSync", api_pb2.ExecSyncRequest(container_id=f"c{i}", cmd=["true"]))
        assert type(served.servicer.seen[-1]) is DeferredCallSpan  # made by its outgoing call, through the stand-in
    assert deferred.eager_methods == {execs}
    served.call("ExecSync", api_pb2.ExecSyncRequest(container_id="eager", cmd=["true"]))
    assert type(served.servicer.seen[-1]) is LightSpan  # made at the start
    served.call("ListContainers", api_pb2.ListContainersRequest())
    assert type(served.servicer.seen[-1]) is DeferredCallSpan  # the polls stay deferred
    # ListContainers, ContainerStatus and its read_state, Version, ExecSync; then ExecSync, ListContainers
    spans = flushed(served, receiver, 5 * USED_IN_A_ROW + 2)
    sent = {f"00-{TRACE_ID}-{s.span_id}-01" for s in spans if s.name == execs}
    assert len(sent) == USED_IN_A_ROW + 1 and set(served.servicer.outgoing) == sent
    assert len([s for s in spans if s.name == LIST]) == USED_IN_A_ROW + 1


def test_a_call_that_leaves_its_span_alone_breaks_a_methods_run_of_uses(
    serve: Callable[..., Served], receiver: OTLPReceiver
) -> None:
    served = serve(receiver)
    deferred = served.tracing.deferred_spans
    assert deferred is not None
    for _ in range(USED_IN_A_ROW - 1):
        served.call("ExecSync", api_pb2.ExecSyncRequest(cmd=["true"]))  # an outgoing call: uses its span
    served.call("ExecSync", api_pb2.ExecSyncRequest(cmd=["quiet"]))
    flushed(served, receiver, USED_IN_A_ROW)  # the export thread makes the quiet call's span
    served.call("ExecSync", api_pb2.ExecSyncRequest(cmd=["true"]))
    assert deferred.eager_methods == set()
