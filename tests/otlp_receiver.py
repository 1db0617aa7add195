"""A real OTLP/gRPC receiver (traces and metrics, on one port like a collector) for tests and
benchmarks: collects what exporters send."""

from __future__ import annotations

import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
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
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace_id, span_id) of each link
    event_times: list[int] = field(default_factory=list)  # time_unix_nano of each event, as `events`

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
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                            event_times=[e.time_unix_nano for e in s.events],
                        )
                    )
        with self.cond:
            self.requests += 1
            self.spans.extend(received)
            self.cond.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()


@dataclass
class ReceivedMetricPoint:
    """One metric data point as a receiver saw it, flattened with its metric and resource.

    kind is "sum", "gauge" or "histogram"; `value` is set for sums and gauges, `count`, `sum`,
    `bucket_counts` and `explicit_bounds` for histograms.
    """

    name: str
    unit: str
    kind: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    value: float | int | None = None
    is_monotonic: bool = False
    temporality: int = 0
    count: int = 0
    sum: float = 0.0
    bucket_counts: list[int] = field(default_factory=list)
    explicit_bounds: list[float] = field(default_factory=list)
    time_ns: int = 0

    @property
    def service(self) -> str:
        return str(self.resource.get("service.name", ""))


def _metric_points(metric: Any, resource: dict[str, Any], scope: str) -> list[ReceivedMetricPoint]:
    kind = metric.WhichOneof("data")
    common = {"name": metric.name, "unit": metric.unit, "resource": resource, "scope": scope}
    points: list[ReceivedMetricPoint] = []
    if kind in ("sum", "gauge"):
        data = getattr(metric, kind)
        for p in data.data_points:
            points.append(
                ReceivedMetricPoint(
                    kind=kind,
                    attributes=_attrs(p.attributes),
                    value=getattr(p, p.WhichOneof("value")) if p.WhichOneof("value") else None,
                    is_monotonic=kind == "sum" and data.is_monotonic,
                    temporality=data.aggregation_temporality if kind == "sum" else 0,
                    time_ns=p.time_unix_nano,
                    **common,
                )
            )
    elif kind == "histogram":
        for p in metric.histogram.data_points:
            points.append(
                ReceivedMetricPoint(
                    kind=kind,
                    attributes=_attrs(p.attributes),
                    temporality=metric.histogram.aggregation_temporality,
                    count=p.count,
                    sum=p.sum,
                    bucket_counts=list(p.bucket_counts),
                    explicit_bounds=list(p.explicit_bounds),
                    time_ns=p.time_unix_nano,
                    **common,
                )
            )
    return points


@dataclass
class _MetricsCollector(metrics_service_pb2_grpc.MetricsServiceServicer):
    points: list[ReceivedMetricPoint] = field(default_factory=list)
    requests: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    def Export(self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: Any) -> Any:
        received = []
        for rm in request.resource_metrics:
            resource = _attrs(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    received.extend(_metric_points(m, resource, sm.scope.name))
        with self.cond:
            self.requests += 1
            self.points.extend(received)
            self.cond.notify_all()
        return metrics_service_pb2.ExportMetricsServiceResponse()


def union_ns(intervals: list[tuple[int, int]]) -> int:
    """Total length covered by at least one (start, end) interval, e.g. of spans running in parallel."""
    total, end = 0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OTLPReceiver:
    """OTLP/gRPC TraceService and MetricsService on 127.0.0.1; can be stopped and restarted on
    the same port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._collector = _Collector()
        self._metrics = _MetricsCollector()
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "OTLPReceiver":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self._collector, server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self._metrics, server)
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

    # --- metrics ---------------------------------------------------------------------------

    @property
    def metric_requests(self) -> int:
        """How many metric export requests arrived."""
        with self._metrics.cond:
            return self._metrics.requests

    def metric_points(self, name: str | None = None) -> list[ReceivedMetricPoint]:
        """Every metric data point received so far (of metric `name`), in arrival order; with
        cumulative temporality the last point of a series holds its current total."""
        with self._metrics.cond:
            points = list(self._metrics.points)
        return [p for p in points if name is None or p.name == name]

    def clear_metrics(self) -> None:
        with self._metrics.cond:
            self._metrics.points.clear()

    def wait_for_metric(
        self, predicate: Callable[[ReceivedMetricPoint], bool], timeout: float = 20.0
    ) -> ReceivedMetricPoint | None:
        """The latest point matching `predicate`, once one has arrived (None after `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._metrics.cond:
            while True:
                found = [p for p in self._metrics.points if predicate(p)]
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return found[-1] if found else None
                self._metrics.cond.wait(remaining)

    def __enter__(self) -> "OTLPReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
