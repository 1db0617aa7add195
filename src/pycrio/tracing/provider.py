"""The process's OpenTelemetry tracing: resource, propagators, a provider whose pipeline can be reloaded."""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any, Mapping

from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pycrio import __version__
from pycrio.config import TracingConfig
from pycrio.tracing.call_span import DeferredSpans
from pycrio.tracing.exporter import ExportHealth
from pycrio.tracing.interceptor import SpanMode
from pycrio.tracing.pipeline import Pipeline, SwitchableSampler, SwitchableSpanProcessor
from pycrio.tracing.span import LightTracerProvider

log = logging.getLogger("pycrio.tracing")

SERVICE_NAME = "pycrio"
# "sdk" makes spans with the SDK's own Tracer and Span instead of pycrio's LightTracer/LightSpan
# (same spans, about twice the CPU per span): for comparisons and as an escape hatch.
SPANS_ENV = "PYCRIO_TRACING_SPANS"
# "eager" makes step spans during their steps, as call spans are with PYCRIO_TRACING_CALL_SPANS=eager.
STEP_SPANS_ENV = "PYCRIO_TRACING_STEP_SPANS"
INSTRUMENTATION_NAME = "pycrio"
RETIRE_THREAD = "pycrio-tracing-retire"  # the thread flushing a pipeline a reload replaced


def make_resource(service_name: str = SERVICE_NAME, attributes: Mapping[str, str] | None = None) -> Resource:
    """service.name/version, host.name, process.pid and `attributes` (pycrio-monitor's pod.id);
    OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME still win, as the OpenTelemetry spec says."""
    ours = Resource(
        {
            "service.name": service_name,
            "service.version": __version__,
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
            **(attributes or {}),
        }
    )
    # Resource.create lets our attributes win over the environment; merging the environment
    # detector once more on top restores the precedence the spec asks for.
    return Resource.create(ours.attributes).merge(OTELResourceDetector().detect())


class Tracing:
    """The process's tracing: one SDK TracerProvider whose sampler and export pipeline follow
    the configuration, also after a reload (`apply`). Spans come from `tracer`; `span_mode`
    tells the CRI interceptor which calls need one; `health` counts what was exported."""

    def __init__(
        self,
        config: TracingConfig,
        service_name: str = SERVICE_NAME,
        attributes: Mapping[str, str] | None = None,
        relay: str = "",
    ) -> None:
        # a pycrio-monitor's: send batches to the daemon's relay socket instead of a collector
        self.relay_path = relay
        self.health = ExportHealth()
        self.health.install()
        self._sampler = SwitchableSampler()
        self._processor = SwitchableSpanProcessor(self.health)
        self.resource = make_resource(service_name, attributes)
        provider_class = TracerProvider if os.environ.get(SPANS_ENV) == "sdk" else LightTracerProvider
        self.provider = provider_class(sampler=self._sampler, resource=self.resource)
        self.provider.add_span_processor(self._processor)
        self.tracer = self.provider.get_tracer(INSTRUMENTATION_NAME, __version__)
        trace.set_tracer_provider(self.provider)
        propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]))
        self.pipeline: Pipeline | None = None
        self.deferred_spans: DeferredSpans | None = None  # the pipeline's: the interceptor reads it per call
        self.config = TracingConfig()
        self._apply_lock = threading.Lock()
        self.apply(config)

    @property
    def enabled(self) -> bool:
        return self.pipeline is not None

    def apply(self, config: TracingConfig, retire_timeout: float = 5.0) -> None:
        """Switch to `config`: spans started from now on follow it, spans in flight end in it.

        The previous pipeline's queue is flushed in the background (bounded by `retire_timeout`).
        """
        with self._apply_lock:
            new = Pipeline(config, self.health, self.relay_path, self.tracer) if config.enable_tracing else None
            old = self.pipeline
            self._processor.current = new.processor if new else None
            self._sampler.current = new.sampler if new else ALWAYS_OFF
            self.pipeline = new
            self.deferred_spans = new.deferred_spans if new else None
            self._defer_steps(self.deferred_spans)
            self.config = config
        if new is not None:
            log.info(
                "tracing enabled: %s, sampling %d per million%s%s",
                f"the daemon's span relay {self.relay_path}" if self.relay_path
                else f"OTLP/gRPC to {config.tracing_endpoint}",
                config.tracing_sampling_rate_per_million,
                "".join(f", {k}={v}" for k, v in sorted(config.sampling_overrides.items())),
                ", keeping error spans" if config.tracing_always_sample_errors else "",
            )
        elif old is not None:
            log.info("tracing disabled")
        if old is not None:
            threading.Thread(
                target=old.shutdown, args=(retire_timeout,), name=RETIRE_THREAD, daemon=True
            ).start()

    def _defer_steps(self, spans: DeferredSpans | None) -> None:
        """Step spans from this provider's tracers made after their steps by `spans` (None: at once)."""
        deferral = getattr(self.provider, "step_deferral", None)  # (not the SDK's own provider)
        if deferral is not None:
            deferral.current = spans if os.environ.get(STEP_SPANS_ENV) != "eager" else None

    def relay(self, spans: int, payload: bytes) -> None:
        """Queue `spans` spans a pycrio-monitor encoded (`SpanRelay`) for export with ours; counted
        as dropped while tracing is off."""
        pipeline = self.pipeline
        if pipeline is None:
            self.health.spans_relay_dropped(spans)
        else:
            pipeline.batch.add_encoded(spans, payload)

    def span_mode(self, method: str) -> SpanMode:
        """Which calls of `method` get a span under the current configuration."""
        pipeline = self.pipeline
        if pipeline is None:
            return SpanMode.NONE
        mode = pipeline.modes.get(method)  # the pipeline's cache, read here: a frame less per call
        return mode if mode is not None else pipeline.span_mode(method)

    def describe(self) -> dict[str, Any]:
        """The running tracing configuration and export health (Status(verbose), `pycrio status`)."""
        config = self.config
        return {
            "enabled": self.enabled,
            "endpoint": config.tracing_endpoint,
            "sampling_rate_per_million": config.tracing_sampling_rate_per_million,
            "sampling_overrides": dict(config.sampling_overrides),
            "always_sample_errors": config.tracing_always_sample_errors,
            "export": self.health.snapshot(),
        }

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Export what is queued and stop; gives up after `timeout` seconds (collector down)."""
        with self._apply_lock:
            pipeline, self.pipeline = self.pipeline, None
            self.deferred_spans = None
            self._defer_steps(None)
            self._processor.current = None
            self._sampler.current = ALWAYS_OFF
        finished = pipeline.shutdown(timeout) if pipeline is not None else True
        self.health.uninstall()
        return finished
