"""A real OTLP/gRPC trace receiver for tests and benchmarks: collects what exporters send."""

from __future__ import annotations

import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
STATUS_OK_UNSET = (0, 1)
STATUS_ERROR = 2


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return _attrs(v.kvlist_value.values)
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    """One span as a receiver saw it, flattened with its resource."""

    service: str
    resource: dict[str, Any]
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int
    status_message: str
    start_ns: int = 0
    end_ns: int = 0

    def log_events(self) -> list[dict[str, Any]]:
        return [attrs for name, attrs in self.events if name == "log"]


@dataclass
class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any) -> Any:
        received = []
        for rs in request.resource_spans:
            resource = _attrs(rs.resource.attributes)
            service = str(resource.get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    received.append(
                        ReceivedSpan(
                            service=service,
                            resource=resource,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            attributes=_attrs(s.attributes),
                            events=[(e.name, _attrs(e.attributes)) for e in s.events],
                            status_code=s.status.code,
                            status_message=s.status.message,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                        )
                    )
        with self.cond:
            self.requests += 1
            self.spans.extend(received)
            self.cond.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OTLPReceiver:
    """OTLP/gRPC TraceService on 127.0.0.1; can be stopped and restarted on the same port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._collector = _Collector()
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "OTLPReceiver":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self._collector, server)
        if server.add_insecure_port(self.endpoint) == 0:
            raise RuntimeError(f"receiver cannot bind {self.endpoint}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def spans(self, predicate: Callable[[ReceivedSpan], bool] | None = None) -> list[ReceivedSpan]:
        with self._collector.cond:
            spans = list(self._collector.spans)
        return [s for s in spans if predicate is None or predicate(s)]

    def clear(self) -> None:
        with self._collector.cond:
            self._collector.spans.clear()

    def wait_for(
        self, predicate: Callable[[ReceivedSpan], bool], count: int = 1, timeout: float = 20.0
    ) -> list[ReceivedSpan]:
        """Spans matching `predicate` once at least `count` have arrived (or whatever came by `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._collector.cond:
            while True:
                found = [s for s in self._collector.spans if predicate(s)]
                remaining = deadline - time.monotonic()
                if len(found) >= count or remaining <= 0:
                    return found
                self._collector.cond.wait(remaining)

    def settle(self, quiet: float = 1.0, timeout: float = 20.0) -> list[ReceivedSpan]:
        """All spans, after nothing new has arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        with self._collector.cond:
            while time.monotonic() < deadline:
                before = len(self._collector.spans)
                self._collector.cond.wait(quiet)
                if len(self._collector.spans) == before:
                    break
            return list(self._collector.spans)

    def __enter__(self) -> "OTLPReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
