"""The span processor that queues finished spans for one export thread: the SDK's batch processor's
promises, with less work per span on the thread that ends it.

What a call's thread does per span, in the SDK's `BatchSpanProcessor`: three calls deep into its
`BatchProcessor.emit`, an `os.getpid()` system call (to notice a fork), two length checks and an
`Event.is_set()` call; its queue-full drops are counted through an internal metrics pipeline that
pycrio had to switch on for it and collect to read one number. Measured in the daemon, the span
processor chain cost the request thread 14 µs per call (bench: ab runs, `no-end-chain`).

`SpanBatcher` keeps the same behaviour:
- a bounded queue (OTEL_BSP_MAX_QUEUE_SIZE, default 2048): when it is full the oldest span is
  dropped, counted in `ExportHealth` (`spans_dropped_queue_full`), and the call is never blocked;
- one daemon thread exports batches of up to OTEL_BSP_MAX_EXPORT_BATCH_SIZE (512) every
  OTEL_BSP_SCHEDULE_DELAY ms (5000), or as soon as a full batch is queued;
- `force_flush` exports everything queued, on the calling thread; `shutdown` stops the thread,
  exports what is left (bounded by OTEL_BSP_EXPORT_TIMEOUT's wait for the thread) and shuts the
  exporter down; spans ending after that are dropped;
- the exporter runs with instrumentation suppressed, so its own gRPC calls make no spans;
- in a forked child the queue starts empty with a thread of its own, at the first span (a fork
  only sets a flag: the daemon forks for every runc and CNI plugin it runs).
Only sampled spans are queued, as the SDK does.

Calls and steps that are over but whose spans are not made yet (`defer`, pycrio.tracing.call_span) wait
beside the queue, under the same bound (a call whose span does not fit makes it itself, where the
drop rule above counts it) and towards a full batch; the export thread makes them before each
export (16 at a time, with a pause for the calls between), and `force_flush` and `shutdown` make
them first, so none is lost.

Relayed monitors' spans (`add_encoded`, pycrio.tracing.relay) arrive already encoded; they wait
beside the queue, bounded by MAX_ENCODED_BYTES (drops counted), count towards a full batch, and
go out appended to the next export's request (at most MAX_ENCODED_PER_EXPORT bytes each).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Sequence

from opentelemetry import context as context_api
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.context.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanContext

from pycrio.tracing.exporter import EXPORT_THREAD_COMM, ExportHealth, SpanBatch, span_count, yield_gil
from pycrio.tracing.span_context import SAMPLED, SPAN_CONTEXT_TUPLE

if TYPE_CHECKING:
    from pycrio.tracing.call_span import DeferredSpan

log = logging.getLogger("pycrio.tracing")

MAX_ENCODED_BYTES = 8 * 1024 * 1024  # relayed bytes waiting for export
# per export request; collectors refuse requests above 4 MiB by default (gRPC's receive limit)
MAX_ENCODED_PER_EXPORT = 2 * 1024 * 1024
# Deferred call spans made between pauses: 16 take about 1.2 M instructions (bench/span_instructions.py
# `make`), the time the encoder's 32 spans take.
MAKE_PAUSE_EVERY = 16


class SpanBatcher(SpanProcessor):
    """Sampled finished spans -> a bounded queue -> batches exported by one thread."""

    def __init__(
        self,
        exporter: SpanExporter,
        health: ExportHealth,
        max_queue_size: int | None = None,
        schedule_delay_millis: float | None = None,
        max_export_batch_size: int | None = None,
        export_timeout_millis: float | None = None,
    ) -> None:
        # The SDK's own readers of OTEL_BSP_* (its defaults, its log line for a bad value).
        if max_queue_size is None:
            max_queue_size = BatchSpanProcessor._default_max_queue_size()
        if schedule_delay_millis is None:
            schedule_delay_millis = BatchSpanProcessor._default_schedule_delay_millis()
        if max_export_batch_size is None:
            max_export_batch_size = BatchSpanProcessor._default_max_export_batch_size()
        if export_timeout_millis is None:
            export_timeout_millis = BatchSpanProcessor._default_export_timeout_millis()
        BatchSpanProcessor._validate_arguments(max_queue_size, schedule_delay_millis, max_export_batch_size)
        self.exporter = exporter
        self._health = health
        self.max_queue_size = max_queue_size
        self.max_export_batch_size = max_export_batch_size
        self._delay = schedule_delay_millis / 1000
        self._join_timeout = export_timeout_millis / 1000
        self._shutdown = False  # no more deferred spans, the export thread stops
        self._closed = False  # shut down: spans ending now are dropped
        self._forked = False
        self._start()
        weak_forked = weakref.WeakMethod(self._mark_forked)

        def after_in_child() -> None:
            mark = weak_forked()
            if mark is not None:
                mark()

        os.register_at_fork(after_in_child=after_in_child)

    def _start(self) -> None:
        self._queue: collections.deque[ReadableSpan] = collections.deque(maxlen=self.max_queue_size)
        self._deferred: collections.deque[DeferredSpan] = collections.deque()
        self._encoded: collections.deque[tuple[int, bytes]] = collections.deque()
        self._encoded_lock = threading.Lock()
        self._encoded_bytes = 0
        self._encoded_spans = 0
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=EXPORT_THREAD_COMM, daemon=True)
        self._thread.start()

    def _mark_forked(self) -> None:
        self._forked = True

    # -- the calls' threads ------------------------------------------------------------------
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None:
            return
        # trace_flags without its property call where the layout is the known tuple
        if not (context[3] if SPAN_CONTEXT_TUPLE and type(context) is SpanContext else context.trace_flags) & SAMPLED:
            return
        if self._closed:
            return
        if self._forked:  # the first span in a forked child: a queue and a thread of its own
            self._forked = False
            self._start()
        queue = self._queue
        if len(queue) == self.max_queue_size:
            self._health.span_dropped_queue_full()  # the append below pushes out the oldest
        queue.append(span)
        # is_set first: with the collector down the queue stays full, and set() takes a lock.
        if len(queue) + len(self._deferred) >= self.max_export_batch_size and not self._wake.is_set():
            self._wake.set()

    def defer(self, span: DeferredSpan) -> bool:
        """Queue the span of a call or step that is over, to be made on the export thread before the
        next export (pycrio.tracing.call_span); False when it must be made now: shutting down,
        in a forked child, or with the queue full (its drop rule then counts the span)."""
        if self._shutdown or self._forked:
            return False
        deferred = self._deferred
        waiting = len(self._queue) + len(deferred)
        if waiting >= self.max_queue_size:
            return False
        deferred.append(span)
        if waiting >= self.max_export_batch_size - 1 and not self._wake.is_set():
            self._wake.set()
        return True

    def add_encoded(self, spans: int, payload: bytes) -> bool:
        """Queue `spans` spans encoded elsewhere (ExportTraceServiceRequest bytes); False, counted
        as dropped, when shut down or over the bound."""
        with self._encoded_lock:
            if self._shutdown or self._encoded_bytes + len(payload) > MAX_ENCODED_BYTES:
                self._health.spans_relay_dropped(spans)
                return False
            self._encoded.append((spans, payload))
            self._encoded_bytes += len(payload)
            self._encoded_spans += spans
            full = len(self._queue) + self._encoded_spans >= self.max_export_batch_size
        self._health.spans_relayed(spans)
        if full:
            self._wake.set()
        return True

    def _take_encoded(self) -> tuple[int, bytes]:
        """Relayed spans for one request: (count, bytes), at most MAX_ENCODED_PER_EXPORT bytes
        (but at least one batch)."""
        spans, parts, size = 0, [], 0
        with self._encoded_lock:
            encoded = self._encoded
            while encoded and (not parts or size + len(encoded[0][1]) <= MAX_ENCODED_PER_EXPORT):
                count, payload = encoded.popleft()
                spans += count
                size += len(payload)
                parts.append(payload)
            self._encoded_bytes -= size
            self._encoded_spans -= spans
        return spans, b"".join(parts)

    # -- the export thread -------------------------------------------------------------------
    def _run(self) -> None:
        name_thread()
        while not self._shutdown:
            woken = self._wake.wait(self._delay)
            if self._shutdown:
                break
            self._wake.clear()
            self._export(all_of_it=False, at_least_one=not woken)
        self._export(all_of_it=True)

    def _export(self, all_of_it: bool, at_least_one: bool = True) -> None:
        """Export full batches while there are any; then one partial batch when `at_least_one`,
        or everything when `all_of_it`."""
        with self._export_lock:
            self._make_deferred()
            queue = self._queue
            encoded = self._encoded
            exported = 0
            while (queue or encoded) and (
                len(queue) + self._encoded_spans >= self.max_export_batch_size
                or all_of_it
                or (at_least_one and not exported)
            ):
                batch: Sequence[ReadableSpan] = [
                    queue.popleft() for _ in range(min(self.max_export_batch_size, len(queue)))
                ]
                if encoded:
                    spans, payload = self._take_encoded()
                    batch = SpanBatch(batch, payload, spans)
                exported += 1
                self._send(batch)

    def _make_deferred(self) -> None:
        """Make and end the spans of the calls deferred so far: into the queue, through the
        pipeline's sampler and processor."""
        deferred = self._deferred
        made = 0
        while deferred:
            span = deferred.popleft()
            try:
                span.made()  # the call or step is over: made through the pipeline's sampler and processor, and ended
            except Exception:  # noqa: BLE001 - one bad span must not end the export thread
                log.exception("tracing: making the span of %s failed", span._deferred_name)
            made += 1
            if not made % MAKE_PAUSE_EVERY and deferred:
                yield_gil()

    def _send(self, batch: Sequence[ReadableSpan]) -> None:
        token = context_api.attach(context_api.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            self.exporter.export(batch)
        except Exception:  # noqa: BLE001 - an exporter bug must not end the export thread
            log.exception("tracing: exporting %d spans failed", span_count(batch))
        finally:
            context_api.detach(token)

    # -- flush and shutdown ------------------------------------------------------------------
    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if self._shutdown:
            return False
        self._export(all_of_it=True)
        return True

    def shutdown(self) -> None:
        if self._shutdown:
            return
        self._shutdown = True
        self._wake.set()
        self._thread.join(self._join_timeout)
        if not self._thread.is_alive():
            self._export(all_of_it=True)  # whatever ended while the thread was finishing
        self._closed = True
        self.exporter.shutdown()

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._deferred) + self._encoded_spans


def name_thread() -> None:
    """The export thread's OS name (`top -H`, /proc/<pid>/task/*/comm): its CPU is then
    readable per thread (bench/tracing_overhead.py)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(EXPORT_THREAD_COMM)
    except OSError:
        pass
