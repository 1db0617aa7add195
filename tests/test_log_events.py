"""Logs and spans: log records become `log` events; errors set the span status."""

from __future__ import annotations

import grpc
import pytest

from pycrio.cri import api_pb2
from tests.harness import drain_startup_probe, tracing_args
from tests.otlp_receiver import STATUS_ERROR, STATUS_OK_UNSET

LIST = "/runtime.v1.RuntimeService/ListContainers"
STATUS = "/runtime.v1.RuntimeService/ContainerStatus"


def test_debug_request_and_response_are_log_events_on_the_span(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint, level="debug"))
    daemon.crictl("ps", tracing_endpoint=receiver.endpoint)
    [span] = receiver.wait_for(lambda s: s.name == LIST)
    events = span.log_events()
    assert [e["log.message"] for e in events] == [
        "Request: ListContainersRequest: filter { state { state: CONTAINER_RUNNING } }",
        "Response: ListContainersResponse: ",
    ]
    for event in events:
        assert event["log.severity"] == "DEBUG"
        assert event["id"] == span.attributes["id"]
        assert event["name"] == LIST
        assert event["code.filepath"].endswith("interceptor.py")
        assert event["code.function"]
        assert event["code.lineno"] > 0
    # The same lines in the daemon's own log carry the call's ids and the trace ids.
    line = next(l for l in daemon.logs().splitlines() if "Request: ListContainersRequest" in l)
    assert f"id={span.attributes['id']}" in line
    assert f"name={LIST}" in line
    assert f"trace_id={span.trace_id}" in line
    assert f"span_id={span.span_id}" in line


def test_info_level_adds_no_debug_events(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint, level="info"))
    daemon.crictl("ps")
    [span] = receiver.wait_for(lambda s: s.name == LIST)
    assert span.log_events() == []
    assert "Request:" not in daemon.logs()


def test_not_found_sets_span_status_error(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint, level="debug"))
    with daemon.channel() as ch, pytest.raises(grpc.RpcError) as err:
        daemon.runtime(ch).ContainerStatus(api_pb2.ContainerStatusRequest(container_id="deadbeef"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "container 'deadbeef' not found" in err.value.details()
    [span] = receiver.wait_for(lambda s: s.name == STATUS)
    assert span.status_code == STATUS_ERROR
    assert "NOT_FOUND" in span.status_message and "deadbeef" in span.status_message
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert any(e["log.message"].startswith("Response error:") for e in span.log_events())


def test_crictl_inspect_unknown_container_is_not_found(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint))
    result = daemon.crictl("inspect", "nosuchcontainer", check=False)
    assert result.returncode != 0
    assert "NotFound" in result.stderr and "nosuchcontainer" in result.stderr
    [span] = receiver.wait_for(lambda s: s.name == STATUS)
    assert span.status_code == STATUS_ERROR


def test_ok_calls_leave_span_status_unset(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint))
    drain_startup_probe(receiver)
    daemon.crictl("version")
    spans = receiver.wait_for(lambda s: s.name.endswith("/Version"))
    assert spans and all(s.status_code in STATUS_OK_UNSET for s in spans)
