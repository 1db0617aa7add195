"""The interceptor on a real in-process gRPC server: failures become statuses, never crashes."""

from __future__ import annotations

import logging
from concurrent import futures
from typing import Iterator

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pycrio.cri import api_pb2, api_pb2_grpc
from pycrio.errors import NotFound
from pycrio.tracing import CRIServerInterceptor, FixedSpanPolicy
from pycrio.tracing.logs import SpanEventHandler

log = logging.getLogger("pycrio.test")


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
    assert span.status.description == "PERMISSION_DENIED: not yours"


def test_cri_error_maps_to_its_status(traced) -> None:
    stub, exporter = traced
    with pytest.raises(grpc.RpcError) as err:
        stub.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    [span] = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR


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
