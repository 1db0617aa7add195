"""pycrio-monitor's tracing and logging: the daemon's `pycrio.tracing.Tracing`, built on first use.

With tracing off nothing of the OpenTelemetry SDK, the OTLP exporter or gRPC is imported (a monitor
runs per pod, its memory counts); `configure` builds the pipeline when the daemon turns tracing on
(flags at start, ConfigureTracing on its reload) and switches it live afterwards. Each request gets
a SERVER span named after its operation, child of the daemon's CLIENT span (W3C context in
Request.trace), with `container_id`, `pod.id` and `uuid`; log records written during it become its
`log` events and carry its trace_id/span_id in the log lines (pycrio.log).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Iterator, Mapping

from pycrio.config.schema import check_host_port, check_sampling_rate
from pycrio.tracing.call import CallInfo, current_call

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from pycrio.tracing.provider import Tracing

log = logging.getLogger("pycrio.monitor")

SERVICE_NAME = "pycrio-monitor"
POD_ID_ATTRIBUTE = "pod.id"
FLUSH_TIMEOUT_SECONDS = 2.0  # spans queued at exit; a lost collector must not hold the pod's removal
PROPAGATION_KEYS = ("traceparent", "tracestate", "baggage")


@dataclass(frozen=True)
class TracingSettings:
    """What the daemon passes: its own [pycrio.tracing] enable/endpoint/rate."""

    enabled: bool = False
    endpoint: str = "127.0.0.1:4317"
    sampling_rate_per_million: int = 0
    relay: str = ""  # the daemon's span relay socket: spans go there instead of to `endpoint`

    def problem(self) -> str | None:
        """Why these settings cannot be used, or None."""
        if self.enabled and not self.relay:
            bad = check_host_port(self.endpoint)
            if bad:
                return f"tracing endpoint {bad}"
        if self.relay and not self.relay.startswith("/"):
            return f"tracing relay must be an absolute socket path, got {self.relay!r}"
        bad = check_sampling_rate(self.sampling_rate_per_million)
        return f"tracing sampling rate {bad}" if bad else None


def setup_logging(level: str, stream: IO[str]) -> None:
    """logfmt lines (trace_id/span_id of the current request's span) plus `log` span events."""
    from pycrio.log import setup_logging as setup

    setup(level, stream)


class RequestSpan:
    """The span of one request (or none: tracing off, or no parent at rate 0); `fail` marks an error."""

    __slots__ = ("span",)

    def __init__(self, span: Span | None) -> None:
        self.span = span

    def fail(self, code_name: str, message: str) -> None:
        if self.span is not None:
            from opentelemetry.trace import Status, StatusCode

            self.span.set_status(Status(StatusCode.ERROR, f"{code_name}: {message}"))

    def set_attribute(self, key: str, value: Any) -> None:
        if self.span is not None:
            self.span.set_attribute(key, value)


class Telemetry:
    """The monitor's tracing: off until configured on; then one Tracing for the process's life."""

    def __init__(self, pod_id: str) -> None:
        self.pod_id = pod_id
        self.settings = TracingSettings()
        self._tracing: Tracing | None = None

    @property
    def enabled(self) -> bool:
        return self._tracing is not None and self._tracing.enabled

    def configure(self, settings: TracingSettings) -> None:
        """Switch to `settings` (at start and on the daemon's reload); raises ValueError if unusable."""
        problem = settings.problem()
        if problem:
            raise ValueError(problem)
        if self._tracing is None and not settings.enabled:
            self.settings = settings
            return
        from pycrio.config.schema import TracingConfig

        config = TracingConfig(
            enable_tracing=settings.enabled,
            tracing_endpoint=settings.endpoint,
            tracing_sampling_rate_per_million=settings.sampling_rate_per_million,
        )
        if self._tracing is None:
            from pycrio.tracing.provider import Tracing

            self._tracing = Tracing(
                config, service_name=SERVICE_NAME, attributes={POD_ID_ATTRIBUTE: self.pod_id}, relay=settings.relay
            )
        else:
            self._tracing.relay_path = settings.relay
            self._tracing.apply(config)
        self.settings = settings

    @contextmanager
    def request(
        self, name: str, request_id: str, carrier: Mapping[str, str], container_id: str = ""
    ) -> Iterator[RequestSpan]:
        """The context of one request: its call info for log lines, and its SERVER span if traced."""
        call_token = current_call.set(CallInfo(request_id, name))
        span_token = None
        span = None
        try:
            tracing = self._tracing
            if tracing is not None and tracing.enabled:
                span, span_token = self._start(tracing, name, request_id, carrier, container_id)
            handle = RequestSpan(span)
            try:
                yield handle
            except BaseException as exc:
                if span is not None and not isinstance(exc, GeneratorExit):
                    handle.fail(type(exc).__name__, str(exc))
                raise
        finally:
            if span is not None:
                span.end()
            if span_token is not None:
                from opentelemetry import context as otel_context

                otel_context.detach(span_token)
            current_call.reset(call_token)

    def _start(
        self, tracing: Tracing, name: str, request_id: str, carrier: Mapping[str, str], container_id: str
    ) -> tuple[Span | None, object]:
        from opentelemetry import context as otel_context
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind

        from pycrio.tracing.attributes import put_attributes
        from pycrio.tracing.interceptor import SpanMode, is_w3c, w3c_parent

        mode = tracing.span_mode(name)
        parent = None
        if "traceparent" in carrier:
            wanted = {k: v for k, v in carrier.items() if k in PROPAGATION_KEYS}
            if len(wanted) == 1 and is_w3c(propagate.get_global_textmap()):  # the daemon's usual carrier
                parent = w3c_parent(wanted["traceparent"])
            if parent is None:
                parent = propagate.extract(wanted)
        if mode is SpanMode.NONE or (parent is None and mode is not SpanMode.ALL):
            return None, None  # a root span at rate 0 would never be recorded: make none at all
        span = tracing.tracer.start_span(name, context=parent, kind=SpanKind.SERVER)
        if span.is_recording():  # our own str values: set without the SDK's cleaning pass
            attributes: dict[str, str] = {POD_ID_ATTRIBUTE: self.pod_id, "uuid": request_id}
            if container_id:
                attributes["container_id"] = container_id
            put_attributes(span, attributes, plain=True)
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    def shutdown(self, timeout: float = FLUSH_TIMEOUT_SECONDS) -> bool:
        """Export what is queued, giving up after `timeout` seconds (collector down)."""
        if self._tracing is None:
            return True
        import threading
        import time

        from pycrio.tracing.provider import RETIRE_THREAD

        deadline = time.monotonic() + timeout
        finished = self._tracing.shutdown(timeout)
        # A pipeline a reconfiguration replaced flushes in the background (Tracing.apply): its
        # daemon thread would die with the process, and its spans with it.
        for thread in threading.enumerate():
            if thread.name == RETIRE_THREAD:
                thread.join(max(0.0, deadline - time.monotonic()))
                finished = finished and not thread.is_alive()
        return finished
