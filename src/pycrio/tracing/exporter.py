"""Span export health: counters, rate-limited failure logs, a recovery log, no SDK spam.

`ExportHealth` lives as long as the process (a configuration reload keeps its counts). What it
counts, and where:
- started: sampled spans started (`SwitchableSpanProcessor.on_start`);
- kept_for_error: unsampled call spans exported because they ended in an error;
- exported: spans the collector accepted (`ReportingSpanExporter`);
- dropped_export_failed: spans of batches the exporter failed to deliver;
- dropped_queue_full: spans the batch processor (`SpanBatcher`) dropped because its queue was full;
- failed_exports: export attempts (batches) that failed;
- relayed: spans pycrio-monitors sent through the daemon's relay socket, queued for export here;
- relay_dropped: relayed spans not queued (tracing off, or the relayed bytes' bound reached).
started + kept_for_error + relayed - exported - dropped_* is what is still queued or in flight.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

# How long the export thread sleeps between chunks of its work (making deferred call spans,
# encoding): a bare release of the GIL is often won back at once (otlp_exporter.PAUSE_EVERY).
PAUSE_SECONDS = 0.0002


def yield_gil() -> None:
    """Let a CRI call thread waiting for the GIL take it."""
    time.sleep(PAUSE_SECONDS)


log = logging.getLogger("pycrio.tracing")

# The OTLP exporter's logger: it logs every failed export; its messages are captured here and
# summarised instead.
SDK_EXPORT_LOGGERS = ("opentelemetry.exporter.otlp.proto.grpc.exporter",)
# The span export thread, as `top -H` and /proc/<pid>/task/*/comm show it (CPU spent encoding and
# sending spans is then readable per thread: bench/tracing_overhead.py).
EXPORT_THREAD_COMM = "pycrio-spans"


class ExportHealth(logging.Filter):
    """Process-wide export counters; also a logging filter that swallows the SDK's export warnings."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        # Counted on every sampled span's start: `next()` of a count is atomic, no lock per span.
        self._started = itertools.count()
        self.kept_for_error = 0
        self.exported = 0
        self.dropped_export_failed = 0
        self.failed_exports = 0
        self.last_success: float | None = None
        self.last_error = ""
        self.last_error_time: float | None = None
        self.failing_since: float | None = None
        self._queue_full = 0
        self.relayed = 0
        self.relay_dropped = 0

    # -- counting (called from span processors and the export thread) ------------------------
    def span_started(self) -> None:
        next(self._started)

    @property
    def started(self) -> int:
        # The count's next value, how many were taken: its repr is "count(N)" (pickling it, which
        # would give N directly, is deprecated since Python 3.12).
        return int(repr(self._started)[6:-1])

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

    def spans_relayed(self, spans: int) -> None:
        with self._lock:
            self.relayed += spans

    def spans_relay_dropped(self, spans: int) -> None:
        with self._lock:
            self.relay_dropped += spans

    def note_error(self, message: str) -> None:
        """The latest export error, from an exporter that does not log through the SDK's logger."""
        with self._lock:
            self.last_error = message
            self.last_error_time = time.time()

    def span_dropped_queue_full(self) -> None:
        with self._lock:
            self._queue_full += 1

    def dropped_queue_full(self) -> int:
        return self._queue_full

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
                "spans_relayed": self.relayed,
                "spans_relay_dropped": self.relay_dropped,
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
        self._queue_full_reported = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self._inner.export(spans)
        count = span_count(spans)
        now = time.monotonic()
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
            self._health.export_succeeded(count)
            if self._failing_since is not None or (self._queue_full_reported and not new_queue_drops):
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
        self._health.export_failed(count)
        self._failed_batches += 1
        self._streak_dropped += count
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


class SpanBatch(list):  # type: ignore[type-arg]
    """A batch of spans plus relayed monitors' spans, already encoded (`encoded`, `encoded_spans`
    of them): pycrio's OTLP exporters append those bytes to the request."""

    def __init__(self, spans: Sequence[ReadableSpan], encoded: bytes, encoded_spans: int) -> None:
        super().__init__(spans)
        self.encoded = encoded
        self.encoded_spans = encoded_spans


def span_count(spans: Sequence[ReadableSpan]) -> int:
    """Spans in a batch, relayed ones included."""
    return len(spans) + getattr(spans, "encoded_spans", 0)
