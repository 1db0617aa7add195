"""SpanBatcher keeps the batch processor's promises: bounded queue with counted drops, batches by
size and by time, flush, shutdown, suppressed instrumentation, one named thread, fork safety."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from opentelemetry import context as otel_context
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

from pycrio.tracing.batch import SpanBatcher
from pycrio.tracing.exporter import EXPORT_THREAD_COMM, ExportHealth
from pycrio.tracing.span import LightTracerProvider


class Recording(SpanExporter):
    def __init__(self, gate: threading.Event | None = None, fail_first: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.threads: list[int] = []
        self.suppressed: list[object] = []
        self.gate = gate
        self.fail_first = fail_first
        self.shut = False

    def export(self, spans: Any) -> SpanExportResult:
        if self.gate is not None:
            self.gate.wait(10)
        self.threads.append(threading.get_native_id())
        self.suppressed.append(otel_context.get_value(_SUPPRESS_INSTRUMENTATION_KEY))
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError("exporter bug")
        self.batches.append([s.name for s in spans])
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.shut = True


def make(exporter: SpanExporter, sampled: bool = True, **kwargs: Any) -> tuple[Callable[[str], None], SpanBatcher, ExportHealth]:
    health = ExportHealth()
    batcher = SpanBatcher(exporter, health, **kwargs)
    provider = LightTracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF)
    provider.add_span_processor(batcher)
    tracer = provider.get_tracer("test")

    def end(name: str) -> None:
        tracer.start_span(name).end()

    return end, batcher, health


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


def test_a_full_batch_goes_out_at_once_and_a_partial_one_after_the_delay() -> None:
    exporter = Recording()
    end, batcher, _ = make(exporter, max_export_batch_size=4, schedule_delay_millis=30_000)
    for i in range(4):
        end(f"s{i}")
    assert wait_for(lambda: exporter.batches == [["s0", "s1", "s2", "s3"]], 3)  # long before 30 s
    batcher.shutdown()
    exporter = Recording()
    end, batcher, _ = make(exporter, max_export_batch_size=4, schedule_delay_millis=100)
    end("alone")
    assert wait_for(lambda: exporter.batches == [["alone"]], 3)
    assert exporter.threads == [exporter.threads[0]] and exporter.threads[0] != threading.get_native_id()
    comm = Path(f"/proc/self/task/{exporter.threads[0]}/comm").read_text().strip()
    assert comm == EXPORT_THREAD_COMM
    assert exporter.suppressed == [True]  # the exporter's own gRPC calls make no spans
    batcher.shutdown()


def test_a_full_queue_drops_the_oldest_counts_it_and_never_blocks() -> None:
    gate = threading.Event()
    exporter = Recording(gate)
    end, batcher, health = make(exporter, max_queue_size=8, max_export_batch_size=2, schedule_delay_millis=30_000)
    end("first")
    end("second")  # a full batch: the thread takes it and waits at the gate
    assert wait_for(lambda: batcher.queued == 0)
    started = time.monotonic()
    for i in range(20):
        end(f"n{i}")
    assert time.monotonic() - started < 1.0  # the calls never waited for the exporter
    assert batcher.queued == 8
    assert health.dropped_queue_full() == 12
    assert health.snapshot()["spans_dropped_queue_full"] == 12
    gate.set()
    batcher.force_flush()
    exported = [name for batch in exporter.batches for name in batch]
    assert exported[:2] == ["first", "second"]
    assert sorted(exported[2:]) == sorted(f"n{i}" for i in range(12, 20))  # the newest 8 were kept
    batcher.shutdown()


def test_flush_and_shutdown_export_everything_and_later_spans_are_dropped() -> None:
    exporter = Recording()
    end, batcher, health = make(exporter, max_export_batch_size=3, schedule_delay_millis=30_000)
    end("a")
    assert batcher.force_flush() is True
    assert exporter.batches == [["a"]]
    assert exporter.threads[-1] == threading.get_native_id()  # on the calling thread
    end("b")
    end("c")
    batcher.shutdown()
    assert [n for b in exporter.batches for n in b] == ["a", "b", "c"] and exporter.shut
    end("late")
    assert batcher.queued == 0 and health.dropped_queue_full() == 0
    assert batcher.force_flush() is False
    batcher.shutdown()  # twice: nothing happens


class Deferred:
    """What SpanBatcher.defer takes: a call's span made (here: by `end`) when the thread asks."""

    def __init__(self, end: Callable[[str], None], name: str) -> None:
        self._end = end
        self._deferred_name = name
        self.made_on: int | None = None

    def made(self) -> None:
        self.made_on = threading.get_native_id()
        self._end(self._deferred_name)


def test_deferred_spans_are_made_by_the_export_thread_and_count_towards_a_full_batch() -> None:
    exporter = Recording()
    end, batcher, _ = make(exporter, max_export_batch_size=4, schedule_delay_millis=30_000)
    calls = [Deferred(end, f"d{i}") for i in range(3)]
    assert all(batcher.defer(call) for call in calls)
    assert batcher.queued == 3 and exporter.batches == []  # waiting, made by no one yet
    end("e")  # the fourth: a full batch wakes the thread, which makes the three first
    assert wait_for(lambda: exporter.batches == [["e", "d0", "d1", "d2"]], 3)
    assert {call.made_on for call in calls} == {exporter.threads[0]} != {threading.get_native_id()}
    assert batcher.defer(Deferred(end, "d3")) and batcher.defer(Deferred(end, "d4"))
    assert batcher.defer(Deferred(end, "d5")) and batcher.defer(Deferred(end, "d6"))  # a full batch again
    assert wait_for(lambda: len(exporter.batches) == 2)
    assert exporter.batches[1] == ["d3", "d4", "d5", "d6"]
    batcher.shutdown()


def test_a_full_queue_or_a_shutdown_refuses_to_defer_and_shutdown_makes_what_waits() -> None:
    gate = threading.Event()
    exporter = Recording(gate)
    end, batcher, health = make(exporter, max_queue_size=4, max_export_batch_size=2, schedule_delay_millis=30_000)
    end("first")
    end("second")  # the thread takes them and waits at the gate
    assert wait_for(lambda: batcher.queued == 0)
    assert all(batcher.defer(Deferred(end, f"d{i}")) for i in range(3))
    end("queued")
    assert batcher.queued == 4
    assert batcher.defer(Deferred(end, "refused")) is False  # full: the call makes its span itself
    assert health.dropped_queue_full() == 0
    gate.set()
    batcher.shutdown()
    exported = [name for batch in exporter.batches for name in batch]
    assert exported[:2] == ["first", "second"] and sorted(exported[2:]) == ["d0", "d1", "d2", "queued"]
    assert batcher.defer(Deferred(end, "late")) is False
    end("late")
    assert batcher.queued == 0


def test_a_deferred_span_that_fails_to_be_made_is_logged_and_the_rest_go_out(caplog) -> None:
    exporter = Recording()
    end, batcher, _ = make(exporter, schedule_delay_millis=30_000)

    class Broken(Deferred):
        def made(self) -> None:
            raise RuntimeError("no parent")

    assert batcher.defer(Broken(end, "/runtime.v1.RuntimeService/Version")) and batcher.defer(Deferred(end, "fine"))
    assert batcher.force_flush()
    assert exporter.batches == [["fine"]]
    assert "making the span of /runtime.v1.RuntimeService/Version failed" in caplog.text
    batcher.shutdown()


def test_unsampled_spans_are_not_queued_and_an_exporter_error_does_not_stop_the_thread() -> None:
    exporter = Recording()
    end, batcher, _ = make(exporter, sampled=False, schedule_delay_millis=50)
    end("unsampled")
    assert batcher.queued == 0
    batcher.shutdown()
    exporter = Recording(fail_first=True)
    end, batcher, _ = make(exporter, max_export_batch_size=1, schedule_delay_millis=30_000)
    end("lost")
    assert wait_for(lambda: len(exporter.threads) == 1)
    end("kept")
    assert wait_for(lambda: exporter.batches == [["kept"]])
    batcher.shutdown()


def test_a_forked_child_starts_with_an_empty_queue_and_a_thread_of_its_own() -> None:
    gate = threading.Event()
    exporter = Recording(gate)
    end, batcher, _ = make(exporter, max_export_batch_size=1, schedule_delay_millis=30_000)
    end("in flight")
    assert wait_for(lambda: batcher.queued == 0)  # the thread holds it at the gate
    end("queued in the parent")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no export thread was inherited, nor the parent's queue
        try:
            gate.set()
            end("child")
            ok = wait_for(lambda: ["child"] in exporter.batches, 3)
            names = [n for b in exporter.batches for n in b]
            os.write(write_end, b"ok" if ok and "queued in the parent" not in names else repr(names).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    answer = os.read(read_end, 1000)
    os.close(read_end)
    assert answer == b"ok"
    gate.set()
    assert wait_for(lambda: [n for b in exporter.batches for n in b] == ["in flight", "queued in the parent"])
    batcher.shutdown()


def test_the_daemons_pipeline_uses_it() -> None:
    from pycrio.config import TracingConfig
    from pycrio.tracing.pipeline import Pipeline

    pipeline = Pipeline(TracingConfig(enable_tracing=True, tracing_endpoint="127.0.0.1:1"), ExportHealth())
    try:
        assert isinstance(pipeline.batch, SpanBatcher)
        assert pipeline.batch.max_queue_size == 2048 and pipeline.batch.max_export_batch_size == 512
    finally:
        pipeline.shutdown(2.0)

