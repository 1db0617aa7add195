"""The OpenTelemetry pipeline: resource, parent-based ratio sampler, batch OTLP/gRPC export."""

from __future__ import annotations

import logging
import os
import socket
import threading

from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pycrio import __version__
from pycrio.config import TracingConfig
from pycrio.tracing.exporter import ExportHealth, ReportingSpanExporter
from pycrio.tracing.sampling import ErrorKeepingSpanProcessor, SamplingRules
from pycrio.tracing.sampling import make_sampler as _make_sampler

log = logging.getLogger("pycrio.tracing")

SERVICE_NAME = "pycrio"
INSTRUMENTATION_NAME = "pycrio"
# The exporter reconnects quickly when a collector comes back, instead of gRPC's 2-minute ceiling.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
)


def make_sampler(
    rate_per_million: int, overrides: dict[str, int] | None = None, always_sample_errors: bool = False
) -> Sampler:
    """CRI-O's sampler: follow the caller's decision; for root calls keep rate/1e6 of trace ids
    (per method when `overrides` name it, see pycrio.tracing.sampling).

    At 0 no trace is started here, but a caller's sampled trace is still continued.
    """
    return _make_sampler(SamplingRules(rate_per_million, overrides), always_sample_errors)


def make_resource(service_name: str = SERVICE_NAME) -> Resource:
    """service.name/version, host.name and process.pid; OTEL_RESOURCE_ATTRIBUTES and
    OTEL_SERVICE_NAME still win, as the OpenTelemetry spec says."""
    ours = Resource(
        {
            "service.name": service_name,
            "service.version": __version__,
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
        }
    )
    # Resource.create lets our attributes win over the environment; merging the environment
    # detector once more on top restores the precedence the spec asks for.
    return Resource.create(ours.attributes).merge(OTELResourceDetector().detect())


class Tracing:
    """One process's tracing pipeline; `tracer` hands out spans, `shutdown` flushes within a bound."""

    def __init__(self, config: TracingConfig, service_name: str = SERVICE_NAME) -> None:
        self.config = config
        self.rules = SamplingRules(config.tracing_sampling_rate_per_million, config.sampling_overrides)
        self.always_sample_errors = config.tracing_always_sample_errors
        # Whether a call without a W3C parent needs a span, per method (see the interceptor).
        self.starts_root_traces = self.always_sample_errors or self.rules.any_root_traces
        self.health = ExportHealth()
        self.health.install()
        otlp = OTLPSpanExporter(endpoint=config.tracing_endpoint, insecure=True, channel_options=CHANNEL_OPTIONS)
        self.exporter = ReportingSpanExporter(otlp, config.tracing_endpoint, self.health)
        # Queue, batch size and delay follow OTEL_BSP_* (SDK defaults 2048/512/5s): bounded, and a
        # full queue drops spans instead of blocking the CRI call that ended them.
        self.processor = BatchSpanProcessor(self.exporter)
        self.provider = TracerProvider(
            sampler=_make_sampler(self.rules, self.always_sample_errors),
            resource=make_resource(service_name),
        )
        # With errors kept, unsampled calls are recorded; only their ERROR spans go on to export.
        self.provider.add_span_processor(
            ErrorKeepingSpanProcessor(self.processor) if self.always_sample_errors else self.processor
        )
        self.tracer = self.provider.get_tracer(INSTRUMENTATION_NAME, __version__)
        trace.set_tracer_provider(self.provider)
        propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]))
        log.info(
            "tracing enabled: OTLP/gRPC to %s, sampling %d per million%s%s",
            config.tracing_endpoint, config.tracing_sampling_rate_per_million,
            "".join(f", {k}={v}" for k, v in sorted(config.sampling_overrides.items())),
            ", keeping error spans" if self.always_sample_errors else "",
        )

    def root_rate(self, method: str) -> int:
        """The effective rate per million for calls of `method` without a W3C parent."""
        return self.rules.rate_for(method)

    def needs_root_span(self, method: str) -> bool:
        """Whether a call of `method` without a W3C parent must get a span: its rate is above 0,
        or errors are kept (any call may end in an error)."""
        return self.always_sample_errors or self.rules.rate_for(method) > 0

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Export what is queued and stop; gives up after `timeout` seconds (collector down)."""
        done = threading.Event()

        def flush_and_stop() -> None:
            try:
                self.provider.shutdown()
            finally:
                done.set()

        threading.Thread(target=flush_and_stop, name="pycrio-tracing-shutdown", daemon=True).start()
        finished = done.wait(timeout)
        if not finished:
            log.warning("tracing shutdown: spans not flushed within %.1fs, dropping them", timeout)
        self.health.uninstall()
        return finished
