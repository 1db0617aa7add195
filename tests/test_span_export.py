"""The daemon's span export with pycrio's OTLP encoder: spans arrive as with the SDK's encoder,
queued spans are flushed on SIGTERM, and a full queue drops without slowing calls."""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import pytest

from pycrio.cri import api_pb2
from tests.harness import metadata_with_parent, tracing_args
from tests.otlp_receiver import OTLPReceiver, ReceivedSpan

LIST = "/runtime.v1.RuntimeService/ListContainers"


def _traffic(daemon: Any, trace_id: str, parent: str) -> None:
    """The same calls to each daemon: a root call, a call under a sampled caller, a failing call."""
    with daemon.channel() as ch:
        stub = daemon.runtime(ch)
        stub.Version(api_pb2.VersionRequest(), timeout=5)
        stub.ListContainers(
            api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(id="abc")),
            metadata=metadata_with_parent(trace_id, parent), timeout=5,
        )  # fmt: skip
        with pytest.raises(grpc.RpcError):
            stub.ContainerStatus(api_pb2.ContainerStatusRequest(container_id="deadbeef"), timeout=5)


def _comparable(span: ReceivedSpan) -> dict[str, Any]:
    """A span without what differs between two daemons and two calls (ids, times, pid, instance)."""
    data = asdict(span)
    for key in ("span_id", "start_ns", "end_ns", "event_times"):
        data.pop(key)
    if not span.parent_span_id:
        data.pop("trace_id")  # a root's trace id is random
    data["resource"] = {k: v for k, v in span.resource.items() if k not in ("process.pid", "service.instance.id")}
    data["attributes"] = {k: v for k, v in span.attributes.items() if k != "id"}
    data["events"] = [(name, {k: v for k, v in attrs.items() if k != "id"}) for name, attrs in span.events]
    return data


def test_spans_arrive_as_with_the_sdk_encoder(make_daemon) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    received = {}
    for encoder in ("sdk", "pycrio"):
        with OTLPReceiver() as receiver:
            env = {"PYCRIO_TRACING_ENCODER": "sdk"} if encoder == "sdk" else {}
            daemon = make_daemon(args=tracing_args(receiver.endpoint, level="debug"), env=env, name=encoder)
            _traffic(daemon, trace_id, parent)
            assert daemon.stop() == 0
            assert ("spans are encoded by the SDK" in daemon.logs()) == (encoder == "sdk")
            received[encoder] = sorted(
                (_comparable(s) for s in receiver.settle(quiet=0.5)), key=lambda s: (s["name"], len(s["events"]))
            )
    assert len(received["pycrio"]) == 4  # the harness's start-up Version and the three calls
    assert received["pycrio"] == received["sdk"]
    by_name = {s["name"]: s for s in received["pycrio"]}
    assert by_name[LIST]["trace_id"] == trace_id and by_name[LIST]["parent_span_id"] == parent
    assert by_name["/runtime.v1.RuntimeService/ContainerStatus"]["status_code"] == 2
    assert any(e[1]["log.message"].startswith("Request: ListContainersRequest") for e in by_name[LIST]["events"])


def test_sigterm_flushes_the_queue(make_daemon, receiver) -> None:
    # A batch delay far beyond the test: only the shutdown flush can export these spans.
    daemon = make_daemon(args=tracing_args(receiver.endpoint), env={"OTEL_BSP_SCHEDULE_DELAY": "600000"})
    with daemon.channel() as ch:
        stub = daemon.runtime(ch)
        for _ in range(300):
            stub.ListContainers(api_pb2.ListContainersRequest(), timeout=5)
    assert receiver.spans() == []
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 10
    assert len(receiver.wait_for(lambda s: s.name == LIST, count=300)) == 300


def test_full_queue_drops_without_slowing_calls(make_daemon, black_hole) -> None:
    # A hung collector holds the export thread; a queue of 64 then drops; calls stay fast.
    env = {"OTEL_EXPORTER_OTLP_TIMEOUT": "2", "OTEL_BSP_MAX_QUEUE_SIZE": "64", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "32"}
    daemon = make_daemon(args=tracing_args(black_hole), env=env)
    slowest = 0.0
    with daemon.channel() as ch:
        stub = daemon.runtime(ch)
        for _ in range(500):
            t0 = time.monotonic()
            stub.ListContainers(api_pb2.ListContainersRequest(), timeout=5)
            slowest = max(slowest, time.monotonic() - t0)
    assert slowest < 1.0  # the export's 2 s deadline never reaches a call
    daemon.wait_for_log("span queue full")
    started = time.monotonic()
    assert daemon.stop() == 0  # the flush at exit gives up at its bound
    assert time.monotonic() - started < 15


def test_export_thread_is_named_for_top(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint))
    assert receiver.wait_for(lambda s: s.service == "pycrio")  # one export has run
    pid = daemon.proc.pid
    names = [(task / "comm").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir()]
    assert names.count("pycrio-spans") == 1
    assert Path(f"/proc/{pid}/comm").read_text().strip() != "pycrio-spans"  # the process keeps its name
