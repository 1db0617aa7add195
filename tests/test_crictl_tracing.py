"""The real crictl against pycrio: every command works, every CRI call is exactly one span."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.harness import drain_startup_probe, tracing_args
from tests.otlp_receiver import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, ReceivedSpan

CRICTL_COMMANDS = [["version"], ["info"], ["ps"], ["pods"], ["images"], ["imagefsinfo"]]


def _is_uuid4(value: str) -> bool:
    try:
        return uuid.UUID(value).version == 4
    except ValueError:
        return False


def _check_server_span(span: ReceivedSpan) -> None:
    service, _, method = span.name[1:].rpartition("/")
    assert span.name.startswith("/runtime.v1.")
    assert span.kind == SPAN_KIND_SERVER
    assert span.attributes["rpc.system"] == "grpc"
    assert span.attributes["rpc.service"] == service
    assert span.attributes["rpc.method"] == method
    assert span.attributes["rpc.grpc.status_code"] == 0
    # The newer RPC conventions, as kubelet's and crictl's otelgrpc write them on their client spans.
    assert span.attributes["rpc.system.name"] == "grpc"
    assert span.attributes["rpc.response.status_code"] == "OK"
    assert span.attributes["name"] == span.name
    assert _is_uuid4(span.attributes["id"])
    assert span.resource["service.name"] == "pycrio"
    assert span.resource["service.version"]
    assert span.resource["host.name"]
    assert isinstance(span.resource["process.pid"], int)


def test_crictl_commands_succeed_against_pycrio(make_daemon) -> None:
    daemon = make_daemon()
    version = daemon.crictl("version").stdout
    assert "RuntimeName:  pycrio" in version
    assert "RuntimeApiVersion:  v1" in version
    info = json.loads(daemon.crictl("info").stdout)
    conditions = {c["type"]: c["status"] for c in info["status"]["conditions"]}
    assert conditions["RuntimeReady"] is True and isinstance(conditions["NetworkReady"], bool)
    assert info["config"]["api"]["listen"] == str(daemon.socket)  # crictl decodes the JSON values
    assert "CONTAINER" in daemon.crictl("ps", "-a").stdout
    assert "POD ID" in daemon.crictl("pods").stdout
    assert "IMAGE ID" in daemon.crictl("images").stdout
    fsinfo = json.loads(daemon.crictl("imagefsinfo").stdout)
    fs = fsinfo["status"]["imageFilesystems"][0]
    assert fs["fsId"]["mountpoint"] == str(daemon.base / "root" / "storage")
    assert int(fs["usedBytes"]["value"]) > 0


@pytest.mark.parametrize("command", CRICTL_COMMANDS, ids=lambda c: c[0])
def test_each_crictl_call_is_one_pycrio_span_child_of_crictl(make_daemon, receiver, command) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint, rate=1_000_000))
    drain_startup_probe(receiver)
    daemon.crictl(*command, tracing_endpoint=receiver.endpoint)
    daemon.stop()  # SIGTERM flushes pycrio's spans; crictl flushed its own on exit
    spans = receiver.settle(quiet=0.5)

    roots = [s for s in spans if s.service == "cri-tools" and not s.parent_span_id]
    assert len(roots) == 1, [s.name for s in spans]
    trace_id = roots[0].trace_id
    clients = [s for s in spans if s.service == "cri-tools" and s.kind == SPAN_KIND_CLIENT]
    servers = [s for s in spans if s.service == "pycrio"]
    assert clients, "crictl made no CRI calls?"
    # One server span per client call, each the child of exactly that call, same trace.
    assert sorted(s.parent_span_id for s in servers) == sorted(c.span_id for c in clients)
    for server in servers:
        client = next(c for c in clients if c.span_id == server.parent_span_id)
        assert server.trace_id == trace_id
        assert server.name == "/" + client.name
        _check_server_span(server)
        # One query by the newer attribute names finds both sides of the call.
        for side in (client, server):
            assert (side.attributes["rpc.system.name"], side.attributes["rpc.response.status_code"]) == ("grpc", "OK")
    ids = [s.attributes["id"] for s in servers]
    assert len(set(ids)) == len(ids), "request ids must be unique per call"


def test_crictl_without_tracing_gets_root_spans_at_full_rate(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint, rate=1_000_000))
    drain_startup_probe(receiver)
    daemon.crictl("ps")
    spans = receiver.wait_for(lambda s: s.name == "/runtime.v1.RuntimeService/ListContainers")
    assert len(spans) == 1
    assert spans[0].parent_span_id == ""
    _check_server_span(spans[0])


def test_otel_resource_environment_is_honoured(make_daemon, receiver) -> None:
    env = {"OTEL_SERVICE_NAME": "pycrio-node-7", "OTEL_RESOURCE_ATTRIBUTES": "k8s.node.name=node-7"}
    daemon = make_daemon(args=tracing_args(receiver.endpoint), env=env)
    [span] = receiver.wait_for(lambda s: s.name.endswith("/Version"))
    assert span.service == "pycrio-node-7"
    assert span.resource["k8s.node.name"] == "node-7"
    assert span.resource["process.pid"] == daemon.proc.pid
