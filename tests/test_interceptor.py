"""The interceptor on a real in-process gRPC server: failures become statuses, never crashes."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import uuid
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pycrio.cri import api_pb2, api_pb2_grpc
from pycrio.errors import NotFound
import pycrio.tracing
from pycrio.tracing import CRIServerInterceptor, FixedSpanPolicy, step_span
from pycrio.tracing.call import new_request_id
from pycrio.tracing.logs import SpanEventHandler

log = logging.getLogger("pycrio.test")


@contextlib.contextmanager
def mock_step_tracer(tracer) -> Iterator[None]:
    """step_span's spans from `tracer` (the process's global provider can be set only once)."""
    saved = pycrio.tracing._STEP_TRACER
    pycrio.tracing._STEP_TRACER = tracer
    try:
        yield
    finally:
        pycrio.tracing._STEP_TRACER = saved


class Servicer(api_pb2_grpc.RuntimeServiceServicer):
    def Version(self, request, context):  # noqa: N802 - gRPC names
        log.warning("about to fail")
        raise RuntimeError("boom")

    def ContainerStatus(self, request, context):  # noqa: N802
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")

    def PodSandboxStatus(self, request, context):  # noqa: N802
        raise NotFound("pod sandbox 'x' not found")

    def RunPodSandbox(self, request, context):  # noqa: N802
        raise ValueError("cgroup parent '/a/../..' escapes the cgroup root")

    def ListContainers(self, request, context):  # noqa: N802
        return api_pb2.ListContainersResponse()

    def StreamContainers(self, request, context):  # noqa: N802
        yield api_pb2.StreamContainersResponse(containers=[api_pb2.Container(id="a")])
        raise RuntimeError("half way")


@pytest.fixture
def traced() -> Iterator[tuple[api_pb2_grpc.RuntimeServiceStub, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    handler = SpanEventHandler()
    logging.getLogger().addHandler(handler)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[CRIServerInterceptor(FixedSpanPolicy(provider.get_tracer("test")))],
    )
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield api_pb2_grpc.RuntimeServiceStub(channel), exporter
    finally:
        server.stop(None)
        logging.getLogger().removeHandler(handler)


def test_unexpected_exception_is_internal_with_message_and_error_span(traced) -> None:
    stub, exporter = traced
    with pytest.raises(grpc.RpcError) as err:
        stub.Version(api_pb2.VersionRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "RuntimeError: boom"
    with pytest.raises(grpc.RpcError):
        stub.Version(api_pb2.VersionRequest(), timeout=5)
    span = exporter.get_finished_spans()[0]
    assert span.name == "/runtime.v1.RuntimeService/Version"
    assert span.kind == SpanKind.SERVER
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert span.attributes["rpc.response.status_code"] == "INTERNAL"
    events = [e for e in span.events if e.name == "log"]
    severities = [e.attributes["log.severity"] for e in events]
    assert severities == ["WARN", "ERROR"]
    assert events[1].attributes["exception.type"] == "RuntimeError"
    assert events[1].attributes["exception.message"] == "boom"
    assert events[0].attributes["name"] == span.name
    assert events[0].attributes["id"] == span.attributes["id"]


def test_handler_abort_keeps_its_code(traced) -> None:
    stub, exporter = traced
    with pytest.raises(grpc.RpcError) as err:
        stub.ContainerStatus(api_pb2.ContainerStatusRequest(container_id="c"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "not yours"
    [span] = exporter.get_finished_spans()
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert span.attributes["rpc.response.status_code"] == "PERMISSION_DENIED"
    assert span.status.description == "PERMISSION_DENIED: not yours"


def test_cri_error_maps_to_its_status(traced) -> None:
    stub, exporter = traced
    with pytest.raises(grpc.RpcError) as err:
        stub.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    [span] = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["rpc.response.status_code"] == "NOT_FOUND"


def test_value_error_is_the_callers_invalid_argument(traced) -> None:
    stub, exporter = traced
    with pytest.raises(grpc.RpcError) as err:
        stub.RunPodSandbox(api_pb2.RunPodSandboxRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "cgroup parent '/a/../..' escapes the cgroup root"
    [span] = exporter.get_finished_spans()
    assert span.status.description == "INVALID_ARGUMENT: cgroup parent '/a/../..' escapes the cgroup root"
    assert not [e for e in span.events if e.attributes.get("log.severity") == "ERROR"]  # not our bug: no error log


def test_stream_failing_midway_delivers_what_it_sent_then_the_error(traced) -> None:
    stub, exporter = traced
    received = []
    with pytest.raises(grpc.RpcError) as err:
        for item in stub.StreamContainers(api_pb2.StreamContainersRequest(), timeout=5):
            received.append(item)
    assert [c.id for r in received for c in r.containers] == ["a"]
    assert err.value.code() == grpc.StatusCode.INTERNAL
    [span] = exporter.get_finished_spans()
    assert span.name == "/runtime.v1.RuntimeService/StreamContainers"
    assert span.status.status_code == StatusCode.ERROR


def test_list_replies_are_logged_compactly() -> None:
    from pycrio.tracing.interceptor import MAX_LOGGED_LIST, describe

    many = api_pb2.ListContainersResponse(
        containers=[api_pb2.Container(id=f"{i:064x}", labels={"app": "x" * 50}) for i in range(500)]
    )
    text = describe(many)
    assert "\n" not in text
    assert len(text) < MAX_LOGGED_LIST + 100
    assert text.endswith("more characters)")
    small = api_pb2.ListContainersResponse(containers=[api_pb2.Container(id="abc")])
    assert describe(small) == 'containers { id: "abc" }'


def test_call_span_attributes_old_and_new_conventions(traced) -> None:
    stub, exporter = traced
    stub.ListContainers(api_pb2.ListContainersRequest(), timeout=5)
    [span] = exporter.get_finished_spans()
    request_id = span.attributes["id"]
    assert uuid.UUID(request_id).version == 4
    assert dict(span.attributes) == {
        "rpc.system": "grpc",
        "rpc.system.name": "grpc",  # kubelet's otelgrpc (semconv v1.40) names
        "rpc.service": "runtime.v1.RuntimeService",
        "rpc.method": "ListContainers",
        "name": "/runtime.v1.RuntimeService/ListContainers",
        "id": request_id,
        "rpc.grpc.status_code": 0,
        "rpc.response.status_code": "OK",
    }


def test_span_limits_still_apply_to_call_spans() -> None:
    """Attributes skip the SDK's cleaning only when no limit could apply; with limits, the SDK's own
    path truncates and drops as it always did."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=SpanLimits(max_span_attributes=3, max_span_attribute_length=6))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[CRIServerInterceptor(FixedSpanPolicy(provider.get_tracer("test")))],
    )
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            api_pb2_grpc.RuntimeServiceStub(channel).ListContainers(api_pb2.ListContainersRequest(), timeout=5)
    finally:
        server.stop(None)
    [span] = exporter.get_finished_spans()
    assert len(span.attributes) == 3
    assert span.attributes["rpc.response.status_code"] == "OK"
    assert all(len(v) <= 6 for v in span.attributes.values() if isinstance(v, str))
    assert span.dropped_attributes == 5


def test_request_ids_unique_within_and_across_processes() -> None:
    ids = [new_request_id() for _ in range(10000)]
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in ids[:100])
    code = "from pycrio.tracing.call import new_request_id as n; print(n(), n())"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
            for _ in range(2)]  # fmt: skip
    others = {i for run in runs for i in run}
    assert len(others) == 4 and not others & set(ids)
    # Another process (a restart) does not continue this one's sequence: its random part differs.
    assert {i[:24] for i in others} != {ids[0][:24]}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked child must not repeat its parent's next ids
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child[:24] != ids[0][:24] and child not in ids


def test_step_span_nests_records_errors_and_cleans_odd_values() -> None:
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    from pycrio.tracing import _StepSpan

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    # step_span's tracer is the global provider's; here the steps are made by this provider's.
    with mock_step_tracer(tracer):
        call = tracer.start_span("call")
        token = otel_context.attach(trace.set_span_in_context(call))
        try:
            with step_span("mount_rootfs", **{"container.id": "c1", "layers": 3}) as step:
                assert trace.get_current_span() is step
                step.set_attribute("cached", True)
                with step_span("inner", path=Path("/var/lib/x"), empty=None):
                    pass
            assert trace.get_current_span() is call
            with pytest.raises(ValueError):
                with step_span("generate_spec"):
                    raise ValueError("bad mount")
            assert trace.get_current_span() is call
        finally:
            otel_context.detach(token)
            call.end()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert dict(spans["mount_rootfs"].attributes) == {"container.id": "c1", "layers": 3, "cached": True}
    assert dict(spans["inner"].attributes) == {"path": "/var/lib/x", "empty": None}  # the SDK cleaned them
    assert spans["inner"].parent.span_id == spans["mount_rootfs"].context.span_id
    assert spans["mount_rootfs"].parent.span_id == call.get_span_context().span_id
    failed = spans["generate_spec"]
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.status.description == "ValueError: bad mount"
    assert [e.name for e in failed.events] == ["exception"]
    assert failed.events[0].attributes["exception.message"] == "bad mount"
    assert failed.end_time is not None
    assert _StepSpan.__slots__  # one small object per step


def test_step_span_without_a_recording_parent_opens_nothing() -> None:
    with step_span("cni_add", **{"pod.id": "p"}) as span:
        assert not span.is_recording()
        span.set_attribute("x", 1)


def test_log_events_keep_the_sdk_limits() -> None:
    """Log events skip the SDK's cleaning only when no limit could apply."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=SpanLimits(max_attribute_length=5))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    handler = SpanEventHandler()
    logging.getLogger().addHandler(handler)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[CRIServerInterceptor(FixedSpanPolicy(provider.get_tracer("test")))],
    )
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError):
                api_pb2_grpc.RuntimeServiceStub(channel).Version(api_pb2.VersionRequest(), timeout=5)
    finally:
        server.stop(None)
        logging.getLogger().removeHandler(handler)
    [span] = exporter.get_finished_spans()
    warn = next(e for e in span.events if e.attributes["log.severity"] == "WARN")
    assert warn.attributes["log.message"] == "about"  # "about to fail", cut by the SDK
    assert warn.attributes["code.lineno"] > 0


@pytest.mark.parametrize(
    "header",
    [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-ff",
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",  # upper case: invalid
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future-holds",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0x",
        "00-0x0f7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n",
        "00-0af7651916cd43dd_448eb211c80319c-b7ad6b7169203331-01",
        "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "garbage",
    ],
)
def test_fast_traceparent_reads_what_the_w3c_propagator_reads(header) -> None:
    from opentelemetry import propagate, trace

    from opentelemetry.trace import NonRecordingSpan

    from pycrio.tracing.interceptor import w3c_parent

    expected = trace.get_current_span(propagate.extract({"traceparent": header})).get_span_context()
    fast = w3c_parent(header)
    usual = len(header) == 55 and header.startswith("00-") and header == header.lower() and expected.is_valid
    assert (fast is not None) == usual  # the form kubelet and crictl send takes the fast path
    if fast is None:  # not the exact usual form: the interceptor asks the propagator
        return
    got = trace.get_current_span(fast).get_span_context()
    made = trace.get_current_span(fast)  # built without NonRecordingSpan's constructor: the same object
    assert type(made) is NonRecordingSpan and vars(made) == vars(NonRecordingSpan(got))
    assert expected.is_valid
    assert tuple(got) == tuple(expected)  # ids, remote flag, flags, trace state and validity
    assert type(fast) is type(propagate.extract({"traceparent": header})) and len(fast) == 1
    assert (got.trace_id, got.span_id, got.trace_flags, got.is_remote, got.trace_state) == (
        expected.trace_id, expected.span_id, expected.trace_flags, expected.is_remote, expected.trace_state
    )


def test_call_spans_continue_the_callers_trace(traced) -> None:
    stub, exporter = traced
    stub.ListContainers(
        api_pb2.ListContainersRequest(),
        metadata=[("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), ("tracestate", "k=v")],
        timeout=5,
    )
    stub.ListContainers(
        api_pb2.ListContainersRequest(),
        metadata=[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")],  # the fast path
        timeout=5,
    )
    stub.ListContainers(
        api_pb2.ListContainersRequest(),
        metadata=[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")],  # not sampled
        timeout=5,
    )
    first, second = exporter.get_finished_spans()
    assert first.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert first.parent.span_id == 0xB7AD6B7169203331 and first.parent.is_remote
    assert first.context.trace_state.get("k") == "v"  # tracestate: read by the propagator
    assert second.context.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
    assert second.parent.span_id == 0x00F067AA0BA902B7 and second.parent.is_remote
    assert second.context.trace_flags.sampled


def test_step_spans_and_log_events_import_neither_the_sdk_nor_grpc() -> None:
    """pycrio-monitor with tracing off imports pycrio.tracing for step_span and the log handler."""
    code = (
        "import sys, pycrio.tracing, pycrio.tracing.logs, pycrio.log\n"
        "print(sorted(m for m in ('grpc', 'opentelemetry.sdk.trace') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
