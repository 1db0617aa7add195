"""Span export that reports its own health: rate-limited failure logs, a recovery log, no spam."""

from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger("pycrio.tracing")

# Loggers of the OTLP exporter and the batch processor: they log every failed export and every
# dropped span; their messages are captured here and summarised instead.
SDK_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.sdk._shared_internal",
)


class ExportHealth(logging.Filter):
    """Swallows the SDK's per-batch warnings, remembering the last one and counting drops."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.last_error = ""
        self.queue_drops = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        message = record.getMessage()
        with self._lock:
            if message.startswith("Queue full"):
                self.queue_drops += 1
            else:
                self.last_error = message
        return False

    def take_queue_drops(self) -> int:
        with self._lock:
            drops, self.queue_drops = self.queue_drops, 0
        return drops

    def install(self) -> None:
        for name in SDK_EXPORT_LOGGERS:
            logging.getLogger(name).addFilter(self)

    def uninstall(self) -> None:
        for name in SDK_EXPORT_LOGGERS:
            logging.getLogger(name).removeFilter(self)


class ReportingSpanExporter(SpanExporter):
    """Wraps the OTLP exporter: logs a failure at most once per `report_interval`, and recovery."""

    def __init__(self, inner: SpanExporter, endpoint: str, health: ExportHealth, report_interval: float = 30.0) -> None:
        self._inner = inner
        self._endpoint = endpoint
        self._health = health
        self._report_interval = report_interval
        self._failing_since: float | None = None
        self._last_report = 0.0
        self._dropped = 0
        self._failed_batches = 0
        self.exported_spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self._inner.export(spans)
        now = time.monotonic()
        self._dropped += self._health.take_queue_drops()
        if result is SpanExportResult.SUCCESS:
            self.exported_spans += len(spans)
            if self._failing_since is not None:
                log.info(
                    "span export to %s recovered after %.1fs: %d batches failed, %d spans dropped",
                    self._endpoint, now - self._failing_since, self._failed_batches, self._dropped,
                )
                self._failing_since = None
                self._failed_batches = 0
            self._dropped = 0
            return result
        self._failed_batches += 1
        self._dropped += len(spans)
        if self._failing_since is None:
            self._failing_since = now
        if self._failed_batches == 1 or now - self._last_report >= self._report_interval:
            self._last_report = now
            log.warning(
                "span export to %s failing, spans are dropped (%d so far, calls are not slowed): %s",
                self._endpoint, self._dropped, self._health.last_error or "export failed",
            )
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)
