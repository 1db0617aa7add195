"""Per CRI method metrics, like CRI-O's `container_runtime_crio_operations*`, in pycrio's namespace.

One SDK MeterProvider (never the global one) with up to two readers: a periodic OTLP/gRPC push
and a Prometheus text endpoint. OpenTelemetry names and units map to Prometheus names so:

=============================  ============  ================================================
OTel instrument (unit)         attributes    Prometheus series
=============================  ============  ================================================
pycrio.operations              operation,    pycrio_operations_total
  counter ({operation})        service
pycrio.operations.errors       operation,    pycrio_operations_errors_total
  counter ({error})            service, code
pycrio.operations.latency      operation,    pycrio_operations_latency_seconds_bucket/_sum/_count
  histogram (s)                service
add_observer("a.b", unit "1")  kind          a_b_total
=============================  ============  ================================================

The Prometheus exporter replaces every character outside [a-zA-Z0-9:] by "_", appends the unit
("s" -> "_seconds"; "1" and {annotations} add nothing) and prometheus_client appends "_total"
to counters. `operation` is the method's short name ("RunPodSandbox"), `service` its gRPC service
("runtime.v1.RuntimeService") and `code` the grpc.StatusCode name ("NOT_FOUND").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from pycrio import __version__
from pycrio.config import MetricsConfig
from pycrio.metrics.prometheus import PrometheusEndpoint
from pycrio.tracing.pipeline import CHANNEL_OPTIONS

log = logging.getLogger("pycrio.metrics")

METER_NAME = "pycrio"
OPERATIONS = "pycrio.operations"
ERRORS = "pycrio.operations.errors"
LATENCY = "pycrio.operations.latency"
# From sub-millisecond list calls to multi-minute image pulls.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)
# Methods are a small fixed set; this only bounds memory against anything unexpected.
_MAX_CACHED_ATTRIBUTES = 1024

Attributes = dict[str, str]


def split_method(method: str) -> tuple[str, str]:
    """("runtime.v1.RuntimeService", "RunPodSandbox") from "/runtime.v1.RuntimeService/RunPodSandbox"."""
    service, _, operation = method.lstrip("/").rpartition("/")
    return service, operation


def _code_name(code: Any) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class ReportingMetricExporter(OTLPMetricExporter):
    """The OTLP metric exporter, logging once when pushes start failing and once when they recover.

    The SDK's own per-attempt warnings go to the OTLP exporter logger, which pycrio.tracing
    silences (for spans); without this a down metrics collector would go unnoticed.
    """

    def __init__(self, endpoint: str, interval: int) -> None:
        super().__init__(endpoint=endpoint, insecure=True, channel_options=CHANNEL_OPTIONS)
        self.endpoint = endpoint
        self.interval = interval
        self.failed_exports = 0  # in the current failure streak
        self.last_success: float | None = None

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        result = super().export(metrics_data, timeout_millis, **kwargs)
        if result is MetricExportResult.SUCCESS:
            self.last_success = time.time()
            if self.failed_exports:
                log.info("metric export to %s recovered after %d failed exports", self.endpoint, self.failed_exports)
            self.failed_exports = 0
        else:
            if not self.failed_exports:
                log.warning("metric export to %s failing; retrying every %ds", self.endpoint, self.interval)
            self.failed_exports += 1
        return result


class CRIMetrics:
    """Operation counts, errors and latencies of CRI calls, pushed over OTLP and/or served to Prometheus.

    With `enable_metrics` false every method is a cheap no-op.
    """

    def __init__(self, config: MetricsConfig, resource: Resource) -> None:
        self.config = config
        self.enabled = config.enable_metrics
        self.prometheus: PrometheusEndpoint | None = None
        self._provider: MeterProvider | None = None
        self._observers: set[str] = set()
        self._attributes: dict[str, Attributes] = {}
        self._operation_counts: dict[str, int] = {}
        self._error_counts: dict[tuple[str, str], int] = {}
        self._counts_lock = threading.Lock()
        self._shutdown_lock = threading.Lock()
        self._shut_down = False
        if not self.enabled:
            return
        readers: list[MetricReader] = []
        self._exporter: ReportingMetricExporter | None = None
        if config.metrics_endpoint:
            exporter = self._exporter = ReportingMetricExporter(config.metrics_endpoint, config.metrics_export_interval)
            readers.append(
                PeriodicExportingMetricReader(exporter, export_interval_millis=config.metrics_export_interval * 1000)
            )
        if config.metrics_port > 0:
            self.prometheus = PrometheusEndpoint(config.metrics_host, config.metrics_port)
            readers.append(self.prometheus.reader)
        self._provider = MeterProvider(
            metric_readers=readers,
            resource=resource,
            # No exemplars: record_call stays cheap and Prometheus text would not show them anyway.
            exemplar_filter=AlwaysOffExemplarFilter(),
            # shutdown() is ours, bounded; an atexit flush could hang on a collector that is down.
            shutdown_on_exit=False,
        )
        self._meter = self._provider.get_meter(METER_NAME, __version__)
        # The two counters are kept here (a dict increment per call) and read by the SDK at each
        # export or scrape: an SDK add() costs ~5 us per reader on the call path, and the
        # histogram already pays that once.
        self._meter.create_observable_counter(
            OPERATIONS, callbacks=[self._observe_operations], unit="{operation}", description="CRI calls, per method."
        )
        self._meter.create_observable_counter(
            ERRORS,
            callbacks=[self._observe_errors],
            unit="{error}",
            description="CRI calls that ended with a non-OK gRPC status, per method and code.",
        )
        self._latency = self._meter.create_histogram(
            LATENCY,
            unit="s",
            description="Duration of CRI calls in seconds, per method.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )

    def start(self) -> None:
        """Serve the Prometheus endpoint when configured; MetricsError when its port cannot be bound."""
        if self.prometheus is not None:
            self.prometheus.start()

    def record_call(self, method: str, code: Any, seconds: float) -> None:
        """Count one finished CRI call; never raises (it runs at the end of every call)."""
        if self._provider is None:
            return
        try:
            attributes = self._attributes.get(method)
            if attributes is None:
                attributes = self._cache_attributes(method)
            self._latency.record(seconds, attributes)
            name = "OK" if code is grpc.StatusCode.OK else _code_name(code)
            with self._counts_lock:
                self._operation_counts[method] = self._operation_counts.get(method, 0) + 1
                if name != "OK":
                    key = (method, name)
                    self._error_counts[key] = self._error_counts.get(key, 0) + 1
        except Exception:  # noqa: BLE001 - metrics must never fail a CRI call
            log.debug("cannot record metrics for %s", method, exc_info=True)

    def _observe_operations(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._counts_lock:
            counts = list(self._operation_counts.items())
        return [Observation(count, self._attributes.get(method) or self._cache_attributes(method)) for method, count in counts]

    def _observe_errors(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._counts_lock:
            counts = list(self._error_counts.items())
        return [
            Observation(count, {**(self._attributes.get(method) or self._cache_attributes(method)), "code": code})
            for (method, code), count in counts
        ]

    def _cache_attributes(self, method: str) -> Attributes:
        service, operation = split_method(method)
        attributes = {"operation": operation, "service": service}
        if len(self._attributes) < _MAX_CACHED_ATTRIBUTES:
            self._attributes[method] = attributes
        return attributes

    def add_observer(
        self, name: str, callback: Callable[[], dict[str, float]], description: str, unit: str = "1",
        gauge: bool = False,
    ) -> None:
        """Publish `callback`'s cumulative {kind: value} totals as the observable counter `name`
        (attribute "kind"), or its current values as a gauge; read at every export and scrape."""
        if self._provider is None:
            return
        if name in self._observers:
            raise ValueError(f"metrics observer {name!r} is already registered")
        self._observers.add(name)

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            try:
                values = callback()
            except Exception:  # noqa: BLE001 - a broken callback must not break the scrape
                log.warning("metrics observer %s failed", name, exc_info=True)
                return []
            return [Observation(value, {"kind": kind}) for kind, value in values.items()]

        create = self._meter.create_observable_gauge if gauge else self._meter.create_observable_counter
        create(name, callbacks=[observe], unit=unit, description=description)

    def describe(self) -> dict[str, Any]:
        """The configuration in effect, for Status(verbose)."""
        if not self.enabled:
            return {"enabled": False}
        return {
            "enabled": True,
            "otlp_endpoint": self.config.metrics_endpoint,
            "export_interval_seconds": self.config.metrics_export_interval,
            "prometheus": self.prometheus.url if self.prometheus is not None else "",
            "otlp_last_success": self._exporter.last_success if self._exporter is not None else None,
            "otlp_failed_exports": self._exporter.failed_exports if self._exporter is not None else 0,
        }

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Stop the HTTP server and push the last OTLP export; gives up after `timeout` seconds
        (collector down). True when everything finished in time."""
        with self._shutdown_lock:
            if self._shut_down:
                return True
            self._shut_down = True
        if self.prometheus is not None:
            self.prometheus.stop()
        provider = self._provider
        if provider is None:
            return True
        done = threading.Event()

        def flush_and_stop() -> None:
            try:
                provider.shutdown(timeout_millis=timeout * 1000)
            except Exception:  # noqa: BLE001
                log.warning("metrics shutdown failed", exc_info=True)
            finally:
                done.set()

        threading.Thread(target=flush_and_stop, name="pycrio-metrics-shutdown", daemon=True).start()
        finished = done.wait(timeout)
        if not finished:
            log.warning("metrics shutdown: last export not done within %.1fs, dropping it", timeout)
        return finished
