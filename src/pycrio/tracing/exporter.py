"""Span export health: counters, rate-limited failure logs, a recovery log, no SDK spam.

`ExportHealth` lives as long as the process (a configuration reload keeps its counts). What it
counts, and where:
- started: sampled spans started (`SwitchableSpanProcessor.on_start`);
- kept_for_error: unsampled call spans exported because they ended in an error;
- exported: spans the collector accepted (`ReportingSpanExporter`);
- dropped_export_failed: spans of batches the exporter failed to deliver;
- dropped_queue_full: spans the batch processor dropped because its queue was full, read from the
  SDK's own `otel.sdk.processor.span.processed{error.type="queue_full"}` counter;
- failed_exports: export attempts (batches) that failed.
started + kept_for_error - exported - dropped_* is what is still queued or in flight.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.environment_variables import OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

log = logging.getLogger("pycrio.tracing")

# Loggers of the OTLP exporter and the batch processor: they log every failed export and (once per
# 20 s) dropped spans; their messages are captured here and summarised instead.
SDK_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.sdk._shared_internal",
)
SDK_PROCESSED_METRIC = "otel.sdk.processor.span.processed"
# The batch processor's export thread, as `top -H` and /proc/<pid>/task/*/comm show it (CPU spent
# encoding and sending spans is then readable per thread: bench/span_export.py).
EXPORT_THREAD_COMM = "pycrio-spans"
DEFAULT_FULL_BATCH = 512  # the SDK's default max export batch size
QUEUE_CHECK_INTERVAL = 1.0  # seconds: the queue-full drop count is read at least this often
SDK_WORKER_PREFIX = "OtelBatch"


def name_export_thread() -> bool:
    """Give the calling thread its OS name if it is a batch processor's worker (not a thread
    that flushes: renaming the main thread would rename the process); False if it is not."""
    if not threading.current_thread().name.startswith(SDK_WORKER_PREFIX):
        return False
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(EXPORT_THREAD_COMM)
    except OSError:
        pass
    return True


def _queue_full_count(data: MetricsData | None) -> int:
    total = 0
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name != SDK_PROCESSED_METRIC:
                    continue
                for point in metric.data.data_points:  # type: ignore[union-attr]
                    if (point.attributes or {}).get("error.type") == "queue_full":
                        total += int(point.value)  # type: ignore[union-attr]
    return total


class ExportHealth(logging.Filter):
    """Process-wide export counters; also a logging filter that swallows the SDK's export warnings."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.started = 0
        self.kept_for_error = 0
        self.exported = 0
        self.dropped_export_failed = 0
        self.failed_exports = 0
        self.last_success: float | None = None
        self.last_error = ""
        self.last_error_time: float | None = None
        self.failing_since: float | None = None
        # Batch processors report their drops to this private meter provider (their
        # `meter_provider` argument); nothing here is exported.
        self._reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self._reader])

    # -- counting (called from span processors and the export thread) ------------------------
    def span_started(self) -> None:
        with self._lock:
            self.started += 1

    def span_kept_for_error(self) -> None:
        with self._lock:
            self.kept_for_error += 1

    def export_succeeded(self, spans: int) -> None:
        with self._lock:
            self.exported += spans
            self.last_success = time.time()
            self.failing_since = None

    def export_failed(self, spans: int) -> None:
        with self._lock:
            self.failed_exports += 1
            self.dropped_export_failed += spans
            if self.failing_since is None:
                self.failing_since = time.time()

    def batch_processor(self, exporter: SpanExporter) -> BatchSpanProcessor:
        """The SDK's batch processor, reporting its queue-full drops to this object.

        The SDK records them only when OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED is true when the
        processor is made; the variable is set for that moment only, so the tracer provider's
        per-span internal metrics stay off.
        """
        saved = os.environ.get(OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED)
        os.environ[OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED] = "true"
        try:
            # Queue, batch size and delay follow OTEL_BSP_* (SDK defaults 2048/512/5s): bounded, and
            # a full queue drops spans instead of blocking the CRI call that ended them.
            return BatchSpanProcessor(exporter, meter_provider=self.meter_provider)
        finally:
            if saved is None:
                del os.environ[OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED]
            else:
                os.environ[OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED] = saved

    def dropped_queue_full(self) -> int:
        return _queue_full_count(self._reader.get_metrics_data())

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain data (for Status(verbose), `pycrio status` and metrics)."""
        queue_full = self.dropped_queue_full()
        with self._lock:
            return {
                "spans_started": self.started,
                "spans_kept_for_error": self.kept_for_error,
                "spans_exported": self.exported,
                "spans_dropped_queue_full": queue_full,
                "spans_dropped_export_failed": self.dropped_export_failed,
                "failed_exports": self.failed_exports,
                "last_export_success": self.last_success,
                "last_export_error": self.last_error,
                "last_export_error_time": self.last_error_time,
                "failing_since": self.failing_since,
            }

    # -- the SDK's log records ---------------------------------------------------------------
    def filter(self, record: logging.LogRecord) -> bool:
        # The OTLP metric exporter logs to the same logger: only span export errors are ours.
        message = record.getMessage()
        if record.levelno >= logging.WARNING and " traces " in message:
            with self._lock:
                self.last_error = message
                self.last_error_time = time.time()
        return False

    def install(self) -> None:
        for name in SDK_EXPORT_LOGGERS:
            logging.getLogger(name).addFilter(self)

    def uninstall(self) -> None:
        for name in SDK_EXPORT_LOGGERS:
            logging.getLogger(name).removeFilter(self)


class ReportingSpanExporter(SpanExporter):
    """Wraps the OTLP exporter: counts, logs a failure streak at most once per `report_interval`,
    logs queue-full drops when they start, and logs recovery."""

    def __init__(self, inner: SpanExporter, endpoint: str, health: ExportHealth, report_interval: float = 30.0) -> None:
        self._inner = inner
        self._endpoint = endpoint
        self._health = health
        self._report_interval = report_interval
        self._failing_since: float | None = None
        self._last_report = 0.0
        self._streak_dropped = 0
        self._failed_batches = 0
        self._queue_full_seen = health.dropped_queue_full()
        self._queue_checked = time.monotonic()
        # The batch processor's full batch (OTEL_BSP_MAX_EXPORT_BATCH_SIZE); the pipeline sets it.
        self.full_batch = DEFAULT_FULL_BATCH
        self._queue_full_reported = False
        self._thread_named = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self._thread_named:
            self._thread_named = name_export_thread()
        result = self._inner.export(spans)
        now = time.monotonic()
        # Reading the drop count collects the batch processor's metrics (about 200 µs). The queue
        # drops spans only while it is full, and a full queue is exported in full batches, so any
        # drop is followed by a full batch: the count is read then, and at least once a second.
        checked = len(spans) >= self.full_batch or now - self._queue_checked >= QUEUE_CHECK_INTERVAL
        new_queue_drops = 0
        if checked:
            self._queue_checked = now
            queue_full = self._health.dropped_queue_full()
            new_queue_drops = queue_full - self._queue_full_seen
            self._queue_full_seen = queue_full
        if new_queue_drops and not self._queue_full_reported:
            self._queue_full_reported = True
            log.warning(
                "span queue full: %d spans dropped before export to %s (spans end faster than they are "
                "exported; calls are not slowed)", new_queue_drops, self._endpoint,
            )
        self._streak_dropped += new_queue_drops
        if result is SpanExportResult.SUCCESS:
            self._health.export_succeeded(len(spans))
            if self._failing_since is not None or (self._queue_full_reported and checked and not new_queue_drops):
                log.info(
                    "span export to %s recovered after %.1fs: %d batches failed, %d spans dropped",
                    self._endpoint, now - (self._failing_since or now), self._failed_batches, self._streak_dropped,
                )
                self._failing_since = None
                self._failed_batches = 0
                self._streak_dropped = 0
                self._queue_full_reported = False
            elif not self._queue_full_reported:
                self._streak_dropped = 0
            return result
        self._health.export_failed(len(spans))
        self._failed_batches += 1
        self._streak_dropped += len(spans)
        if self._failing_since is None:
            self._failing_since = now
        if self._failed_batches == 1 or now - self._last_report >= self._report_interval:
            self._last_report = now
            log.warning(
                "span export to %s failing, spans are dropped (%d so far, calls are not slowed): %s",
                self._endpoint, self._streak_dropped, self._health.last_error or "export failed",
            )
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)
