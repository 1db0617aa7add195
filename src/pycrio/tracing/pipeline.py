"""One tracing configuration's sampler and export pipeline, and the seams that swap it live.

The process has one SDK TracerProvider for its whole life (the global provider can be set only
once, and step spans use it). Its sampler and its span processor are the two switches below;
a configuration reload builds a new `Pipeline` and points both switches at it. A span started
under the old pipeline ends in the new one's processor, so calls in flight during a reload keep
their spans.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from pycrio.config import TracingConfig
from pycrio.tracing.batch import SpanBatcher
from pycrio.tracing.call_span import DeferredSpans
from pycrio.tracing.exporter import ExportHealth, ReportingSpanExporter
from pycrio.tracing.interceptor import SpanMode
from pycrio.tracing.sampling import ErrorKeepingSpanProcessor, SamplingRules, make_sampler
from pycrio.tracing.span import LightTracer
from pycrio.tracing.span_context import SAMPLED

log = logging.getLogger("pycrio.tracing")

# The exporter reconnects quickly when a collector comes back, instead of gRPC's 2-minute ceiling.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
)
# "eager" makes every call's span on the call's thread, none after the call
# (pycrio.tracing.call_span): for comparisons (bench/span_instructions.py) and as an escape hatch.
CALL_SPANS_ENV = "PYCRIO_TRACING_CALL_SPANS"
# "sdk" encodes spans with the SDK's protobuf messages instead of pycrio's byte encoder (same
# bytes, 5-8x the CPU): for comparisons (bench/span_export.py) and as an escape hatch.
ENCODER_ENV = "PYCRIO_TRACING_ENCODER"


class Pipeline:
    """Sampler, batch processor and OTLP exporter of one (enabled) tracing configuration."""

    def __init__(
        self, config: TracingConfig, health: ExportHealth, relay: str = "", tracer: object = None
    ) -> None:
        self.config = config
        self.rules = SamplingRules(config.tracing_sampling_rate_per_million, config.sampling_overrides)
        self.always_sample_errors = config.tracing_always_sample_errors
        self.sampler = make_sampler(self.rules, self.always_sample_errors)
        self.exporter = ReportingSpanExporter(
            make_exporter(config, health, relay), f"relay {relay}" if relay else config.tracing_endpoint, health
        )
        self.batch = SpanBatcher(self.exporter, health)
        # With errors kept, unsampled calls are recorded; only their ERROR spans go on to export.
        self.processor: SpanProcessor = (
            ErrorKeepingSpanProcessor(self.batch, on_kept=health.span_kept_for_error)
            if self.always_sample_errors
            else self.batch
        )
        self.modes: dict[str, SpanMode] = {}
        # Call spans made after their calls, by the batch's export thread, where the tracer can.
        self.deferred_spans: DeferredSpans | None = None
        if type(tracer) is LightTracer and tracer.light and os.environ.get(CALL_SPANS_ENV) != "eager":
            self.deferred_spans = DeferredSpans(tracer, self.sampler, self.processor, self.batch, health)

    def span_mode(self, method: str) -> SpanMode:
        """ALL when a call without a W3C parent may be recorded (its rate is above 0, or errors
        are kept: any call may end in an error), else WITH_PARENT. Cached per method."""
        mode = self.modes.get(method)
        if mode is None:
            root = self.always_sample_errors or self.rules.rate_for(method) > 0
            mode = self.modes[method] = SpanMode.ALL if root else SpanMode.WITH_PARENT
        return mode

    def shutdown(self, timeout: float) -> bool:
        """Export what is queued and stop, giving up after `timeout` seconds (collector down)."""
        done = threading.Event()

        def flush_and_stop() -> None:
            try:
                self.processor.shutdown()
            finally:
                done.set()

        threading.Thread(target=flush_and_stop, name="pycrio-tracing-shutdown", daemon=True).start()
        finished = done.wait(timeout)
        if not finished:
            log.warning(
                "tracing: spans for %s not flushed within %.1fs, dropping them", self.config.tracing_endpoint, timeout
            )
        return finished


def make_exporter(config: TracingConfig, health: ExportHealth, relay: str = "") -> SpanExporter:
    """OTLP/gRPC to the configured endpoint; with `relay` (a pycrio-monitor given the daemon's
    relay socket), datagrams to the daemon, which exports them with its own spans: no channel."""
    if relay:
        from pycrio.tracing.relay import RelaySpanExporter

        return RelaySpanExporter(relay, health)
    from pycrio.tracing.otlp_exporter import FastOTLPSpanExporter, SdkOTLPSpanExporter

    exporter_class: type[SpanExporter] = FastOTLPSpanExporter
    if os.environ.get(ENCODER_ENV) == "sdk":
        log.info("tracing: %s=sdk: spans are encoded by the SDK's protobuf messages", ENCODER_ENV)
        exporter_class = SdkOTLPSpanExporter
    return exporter_class(endpoint=config.tracing_endpoint, insecure=True, channel_options=CHANNEL_OPTIONS)


class SwitchableSampler(Sampler):
    """The provider's sampler: asks the current pipeline's; drops everything while tracing is off."""

    def __init__(self) -> None:
        self.current: Sampler = ALWAYS_OFF

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        return self.current.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"Switchable{{{self.current.get_description()}}}"


class SwitchableSpanProcessor(SpanProcessor):
    """The provider's one processor: hands spans to the current pipeline (none while tracing is
    off) and counts the sampled spans started."""

    def __init__(self, health: ExportHealth) -> None:
        self.current: SpanProcessor | None = None
        self._health = health

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        processor = self.current
        if processor is not None:
            context = span.context
            if context is not None and context.trace_flags & SAMPLED:
                self._health.span_started()
            processor.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        processor = self.current
        if processor is not None:
            processor.on_end(span)

    def shutdown(self) -> None:
        processor, self.current = self.current, None
        if processor is not None:
            processor.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        processor = self.current
        return processor.force_flush(timeout_millis) if processor is not None else True
