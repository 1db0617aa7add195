"""CPU of the span export path: the SDK's OTLP encoder vs pycrio's, and what an exporter process would cost.

Two parts (`isolated`, `e2e`, or both by default):

isolated: in this process, on batches of 512 spans shaped like the CRI interceptor's (SERVER, its
  6 attributes; with 0 and 1 `log` event), CPU time per span (best of several runs, thread CPU) of
  - sdk:      opentelemetry's encode_spans(batch).SerializeToString() (what OTLPSpanExporter sends);
  - pycrio:   pycrio.tracing.otlp_encode.SpanEncoder.encode_request(batch) (the same bytes);
  - records:  design (a)'s daemon side: each finished span as a compact tuple, marshal.dumps of the
              batch, written to a pipe (a `cat >/dev/null` child reads it);
  - loads:    design (a)'s exporter-process side before it can encode: marshal.loads of the batch;
  and, with a live OTLP receiver in another process, process CPU per span (all threads: the
  exporter's and gRPC's) of one OTLPSpanExporter.export(batch) with each encoder.

e2e: daemons side by side (tracing off; on at 1000000 per million with the SDK's encoder; with
  pycrio's; pycrio's with the collector down), tests/otlp_receiver.OTLPReceiver in its own process,
  interleaved blocks of sequential ListContainers calls (order rotated per block). Reported: p50
  and p99 (pooled), and daemon CPU per call from /proc/<pid>/stat (utime+stime of the daemon,
  which has no child doing tracing work) over all blocks, including the export of the last
  batches (the receiver is waited for). "extra" is CPU per call above the tracing-off daemon;
  "export thread" the part of it spent in the span export thread (named pycrio-spans).

Run from the repo root (root, like the tests):  .venv/bin/python bench/span_export.py [isolated|e2e]
                                                 [--blocks 10] [--calls 300]
"""

from __future__ import annotations

import argparse
import marshal
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

from pycrio.tracing.otlp_encode import SpanEncoder, sdk_encode  # noqa: E402
from pycrio.tracing.provider import make_resource  # noqa: E402

LIST = "/runtime.v1.RuntimeService/ListContainers"
BATCH = 512
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- spans like the interceptor's --------------------------------------------------------------
class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def call_spans(n: int, events: int) -> list[ReadableSpan]:
    keep = _Keep()
    provider = TracerProvider(resource=make_resource())
    provider.add_span_processor(SimpleSpanProcessor(keep))
    tracer = provider.get_tracer("pycrio", "0.1.0")
    for _ in range(n):
        request_id = str(uuid.uuid4())
        span = tracer.start_span(
            LIST,
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc", "rpc.service": "runtime.v1.RuntimeService", "rpc.method": "ListContainers",
                "id": request_id, "name": LIST,
            },
        )
        for _ in range(events):
            span.add_event("log", {
                "log.severity": "DEBUG", "log.message": "Request: ListContainersRequest: ",
                "code.function": "_begin", "code.filepath": "/src/pycrio/tracing/interceptor.py",
                "code.lineno": 194, "id": request_id, "name": LIST,
            })  # fmt: skip
        span.set_attribute("rpc.grpc.status_code", 0)
        span.end()
    return keep.spans


def step_spans(n: int) -> list[ReadableSpan]:
    """Step spans (pycrio.tracing.step_span) as RunPodSandbox makes them: INTERNAL children with
    an attribute or two, under one SERVER span."""
    keep = _Keep()
    provider = TracerProvider(resource=make_resource())
    provider.add_span_processor(SimpleSpanProcessor(keep))
    tracer = provider.get_tracer("pycrio", "0.1.0")
    with tracer.start_as_current_span("/runtime.v1.RuntimeService/RunPodSandbox", kind=SpanKind.SERVER):
        for i in range(n - 1):
            with tracer.start_as_current_span("create network namespace", attributes={"pod.id": "ab" * 32, "step": i}):
                pass
    return keep.spans


def record(span: ReadableSpan) -> tuple[Any, ...]:
    """Design (a): one finished span as a marshal-able tuple (the SDK's fields, read directly)."""
    ctx = span._context
    parent = span._parent
    status = span._status
    return (
        ctx.trace_id, ctx.span_id, int(ctx.trace_flags), parent.span_id if parent else None,
        parent.is_remote if parent else None, span._name, span._kind._value_, span._start_time, span._end_time,
        tuple(span._attributes._dict.items()),
        tuple((e.name, e.timestamp, tuple(e.attributes._dict.items())) for e in span._events._dq),
        span._instrumentation_scope.name,
        status._status_code._value_, status._description,
    )


def best_us_per_span(fn: Callable[[], Any], spans: int, repeat: int = 7) -> float:
    """Best thread-CPU time of `fn` over `repeat` runs, per span."""
    times = []
    for _ in range(repeat):
        start = time.thread_time_ns()
        fn()
        times.append(time.thread_time_ns() - start)
    return min(times) / spans / 1000


def isolated() -> None:
    print(f"isolated, CPU µs per span, batches of {BATCH} (best of 7 runs)")
    print(f"{'':10} {'sdk':>8} {'pycrio':>8} {'records':>8} {'loads':>8}   bytes/span")
    reader = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert reader.stdin is not None
    pipe = reader.stdin.fileno()
    encoder = SpanEncoder()
    for events in (0, 1, "steps"):
        spans = step_spans(BATCH) if events == "steps" else call_spans(BATCH, int(events))
        assert encoder.encode_request(spans) == sdk_encode(spans)
        size = len(sdk_encode(spans)) / BATCH

        def records() -> None:
            data = marshal.dumps([record(s) for s in spans])
            view = memoryview(data)
            while view:
                view = view[os.write(pipe, view):]

        frame = marshal.dumps([record(s) for s in spans])
        row = [
            best_us_per_span(lambda: sdk_encode(spans), BATCH, repeat=3),
            best_us_per_span(lambda: encoder.encode_request(spans), BATCH),
            best_us_per_span(records, BATCH),
            best_us_per_span(lambda: marshal.loads(frame), BATCH),
        ]
        label = "step spans" if events == "steps" else f"{events} events  "
        print(f"{label:10}" + " ".join(f"{v:8.2f}" for v in row) + f"   {size:.0f} (records {len(frame) / BATCH:.0f})")
    reader.stdin.close()
    reader.wait()
    export_cpu()
    pipeline_cpu()
    gil_delay()


def export_cpu() -> None:
    """Process CPU per span of OTLPSpanExporter.export, each encoder, to a receiver in another process."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    from pycrio.tracing.otlp_exporter import FastOTLPSpanExporter

    receiver = Receiver()
    try:
        spans = call_spans(BATCH, 0)
        exporters = {
            "sdk": OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True),
            "pycrio": FastOTLPSpanExporter(endpoint=receiver.endpoint, insecure=True),
        }
        for exporter in exporters.values():
            assert exporter.export(spans) is SpanExportResult.SUCCESS  # connect, warm up
        results: dict[str, list[float]] = {name: [] for name in exporters}
        for _ in range(7):
            for name, exporter in exporters.items():
                start = time.process_time_ns()
                assert exporter.export(spans) is SpanExportResult.SUCCESS
                results[name].append((time.process_time_ns() - start) / BATCH / 1000)
        for exporter in exporters.values():
            exporter.shutdown()
        print("export(batch) to a live receiver, process CPU µs per span (median of 7): "
              + ", ".join(f"{name} {statistics.median(v):.1f}" for name, v in results.items()))
    finally:
        receiver.stop()


def pipeline_cpu(spans: int = 2048, rounds: int = 5) -> None:
    """Process CPU per span of the whole export half, in this process: span processor (queue) and
    export thread (encoder, gRPC) to a live receiver, above a provider with no processor."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import SpanProcessor

    from pycrio.tracing.batch import SpanBatcher
    from pycrio.tracing.exporter import ExportHealth, ReportingSpanExporter
    from pycrio.tracing.otlp_exporter import FastOTLPSpanExporter
    from pycrio.tracing.pipeline import SwitchableSpanProcessor

    class Null(SpanExporter):
        def export(self, batch: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    receiver = Receiver()
    health = ExportHealth()
    switch = SwitchableSpanProcessor(health)
    provider = TracerProvider(resource=make_resource())
    provider.add_span_processor(switch)
    tracer = provider.get_tracer("pycrio", "0.1.0")
    processors: dict[str, SpanProcessor | None] = {
        "no processor": None,
        "queue, null exporter": SpanBatcher(Null(), health),
        "queue, sdk exporter": SpanBatcher(
            ReportingSpanExporter(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True), "r", health), health),
        "queue, pycrio exporter": SpanBatcher(
            ReportingSpanExporter(FastOTLPSpanExporter(endpoint=receiver.endpoint, insecure=True), "r", health),
            health),
    }  # fmt: skip
    results: dict[str, list[float]] = {name: [] for name in processors}
    try:
        for round_ in range(rounds + 1):
            for name, processor in processors.items():
                switch.current = processor
                start = time.process_time_ns()
                for _ in range(spans):
                    span = tracer.start_span(LIST, kind=SpanKind.SERVER, attributes={
                        "rpc.system": "grpc", "rpc.service": "runtime.v1.RuntimeService",
                        "rpc.method": "ListContainers", "id": str(uuid.uuid4()), "name": LIST,
                    })  # fmt: skip
                    span.set_attribute("rpc.grpc.status_code", 0)
                    span.end()
                if processor is not None:
                    processor.force_flush()
                if round_:  # the first round warms up (connects)
                    results[name].append((time.process_time_ns() - start) / spans / 1000)
        receiver.take()
    finally:
        for processor in processors.values():
            if processor is not None:
                processor.shutdown()
        receiver.stop()
    base = statistics.median(results["no processor"])
    print(f"span + export half, process CPU µs per span (median of {rounds} rounds of {spans}):")
    for name, values in results.items():
        print(f"  {name:24} {statistics.median(values):6.1f}   export half {statistics.median(values) - base:6.1f}")


def gil_delay(batches: int = 20) -> None:
    """How long a thread that needs the GIL waits while the export thread works on a batch: a
    probe thread sleeps 200 µs in a loop and records how late it wakes; meanwhile this thread
    encodes (or, for design (a), turns into records) batches of 512 spans back to back."""
    import threading

    spans = call_spans(BATCH, 0)
    encoder = SpanEncoder()
    from pycrio.tracing.exporter import yield_gil
    from pycrio.tracing.otlp_exporter import PAUSE_EVERY
    work: dict[str, Callable[[], Any]] = {
        "idle": lambda: time.sleep(0.003),
        "sdk encoder": lambda: sdk_encode(spans),
        "pycrio, no pause": lambda: encoder.encode_request(spans),
        "pycrio, paced": lambda: encoder.encode_request(spans, yield_gil, PAUSE_EVERY),
        "(a) records+marshal": lambda: marshal.dumps([record(s) for s in spans]),
    }
    print("GIL wait of a probe thread (wakes every 200 µs) while a batch of 512 is worked on, µs late:")
    for name, fn in work.items():
        late: list[int] = []
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set():
                t0 = time.perf_counter_ns()
                time.sleep(0.0002)
                late.append((time.perf_counter_ns() - t0) // 1000 - 200)

        thread = threading.Thread(target=probe)
        thread.start()
        time.sleep(0.01)
        start = time.perf_counter()
        for _ in range(batches):
            fn()
            time.sleep(0.002)
        elapsed = (time.perf_counter() - start) / batches * 1000
        stop.set()
        thread.join()
        late.sort()
        print(f"  {name:22} p50 {late[len(late) // 2]:5d}  p99 {late[int(len(late) * 0.99)]:5d}  max {late[-1]:5d}"
              f"   (batch {elapsed - 2:.1f} ms wall)")


# -- end to end ------------------------------------------------------------------------------
class Receiver:
    """tests/otlp_receiver.OTLPReceiver in a child process; `take()` returns and forgets its span count."""

    SCRIPT = (
        "import sys; sys.path.insert(0, sys.argv[1]); from tests.otlp_receiver import OTLPReceiver\n"
        "r = OTLPReceiver(int(sys.argv[2])).start(); print('ready', flush=True)\n"
        "for line in sys.stdin:\n"
        "    n = len(r.spans()); r.clear(); print(n, flush=True)\n"
    )

    def __init__(self) -> None:
        from tests.otlp_receiver import free_port

        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, str(REPO), str(self.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def take(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def export_thread_ticks(pid: int) -> int:
    """utime+stime of the daemon's span export threads (named pycrio-spans by pycrio.tracing)."""
    from pycrio.tracing.exporter import EXPORT_THREAD_COMM

    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        comm, rest = text.split("(", 1)[1].rsplit(")", 1)
        if comm == EXPORT_THREAD_COMM:
            fields = rest.split()
            total += int(fields[11]) + int(fields[12])
    return total


def e2e(blocks: int, calls: int) -> None:
    import grpc

    from pycrio.cri import api_pb2, api_pb2_grpc
    from tests.harness import PycrioDaemon, tracing_args
    from tests.otlp_receiver import free_port

    receiver = Receiver()
    down = f"127.0.0.1:{free_port()}"
    env = {"OTEL_BSP_SCHEDULE_DELAY": "5000"}  # the SDK default, as in production
    configs: dict[str, tuple[list[str], dict[str, str]]] = {
        "off": ([], env),
        "sdk encoder": (tracing_args(receiver.endpoint), {**env, "PYCRIO_TRACING_ENCODER": "sdk"}),
        "pycrio encoder": (tracing_args(receiver.endpoint), env),
        "pycrio, collector down": (tracing_args(down), env),
    }
    base = Path(tempfile.mkdtemp(prefix="pycrio-span-export-"))
    daemons: dict[str, PycrioDaemon] = {}
    try:
        for i, (name, (args, daemon_env)) in enumerate(configs.items()):
            daemons[name] = PycrioDaemon(base / f"d{i}", args=args, env=daemon_env).start()
        channels = {name: grpc.insecure_channel(d.endpoint) for name, d in daemons.items()}
        stubs = {name: api_pb2_grpc.RuntimeServiceStub(ch) for name, ch in channels.items()}
        request = api_pb2.ListContainersRequest()
        for stub in stubs.values():
            for _ in range(100):
                stub.ListContainers(request, timeout=10)
        time.sleep(6)  # warm-up spans exported
        receiver.take()
        latencies: dict[str, list[int]] = {name: [] for name in configs}
        start_cpu = {name: cpu_ticks(d.proc.pid) for name, d in daemons.items()}  # type: ignore[union-attr]
        start_export = {name: export_thread_ticks(d.proc.pid) for name, d in daemons.items()}  # type: ignore[union-attr]
        names = list(configs)
        for block in range(blocks):
            order = names[block % len(names):] + names[:block % len(names)]
            for name in order:
                stub = stubs[name]
                out = latencies[name]
                for _ in range(calls):
                    t0 = time.perf_counter_ns()
                    stub.ListContainers(request, timeout=10)
                    out.append(time.perf_counter_ns() - t0)
        traced = blocks * calls * 2  # the two daemons exporting to the receiver
        deadline = time.monotonic() + 30
        got = 0
        while time.monotonic() < deadline and got < traced:
            time.sleep(1)
            got += receiver.take()
        end_cpu = {name: cpu_ticks(d.proc.pid) for name, d in daemons.items()}  # type: ignore[union-attr]
        end_export = {name: export_thread_ticks(d.proc.pid) for name, d in daemons.items()}  # type: ignore[union-attr]
        for ch in channels.values():
            ch.close()
    finally:
        for d in daemons.values():
            d.stop()
        receiver.stop()
    n = blocks * calls
    print(f"\ne2e: {blocks} interleaved blocks x {calls} sequential ListContainers per daemon; "
          f"receiver got {got}/{traced} spans")
    print(f"{'':24} {'p50 µs':>8} {'p99 µs':>8} {'p50/off':>8} {'p99/off':>8} {'CPU µs/call':>12} {'extra':>8}"
          f" {'export thread':>14}")
    off = latencies["off"]
    off_p50, off_p99 = pct(off, 50), pct(off, 99)
    off_cpu = (end_cpu["off"] - start_cpu["off"]) / CLK_TCK / n * 1e6
    for name, values in latencies.items():
        cpu = (end_cpu[name] - start_cpu[name]) / CLK_TCK / n * 1e6
        p50, p99 = pct(values, 50), pct(values, 99)
        export = (end_export[name] - start_export[name]) / CLK_TCK / n * 1e6
        print(f"{name:24} {p50:8.0f} {p99:8.0f} {p50 / off_p50:8.2f} {p99 / off_p99:8.2f} {cpu:12.0f} {cpu - off_cpu:8.0f}"
              f" {export:14.1f}")


def pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))] / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", choices=("isolated", "e2e", "all"), default="all")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--calls", type=int, default=300)
    opts = parser.parse_args()
    if opts.part in ("isolated", "all"):
        isolated()
    if opts.part in ("e2e", "all"):
        e2e(opts.blocks, opts.calls)


if __name__ == "__main__":
    main()
