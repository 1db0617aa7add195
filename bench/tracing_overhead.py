"""Tracing and metrics overhead of pycrio: per-call latency of cheap CRI calls under five setups.

What is measured: the client-side latency of sequential unary CRI calls (Version and
ListContainers, both trivially cheap, so the per-call tracing work dominates any difference)
against five pycrio daemons running side by side:

1. "disabled"                      tracing off, no span objects made at all;
2. "rate 0"                        tracing on, rate 0: calls without a W3C parent get no span;
3. "rate 1000000, collector up"    every call is a sampled span exported to a live receiver;
4. "rate 1000000, collector down"  every call is a span, exported to a closed port;
5. "metrics on, tracing off"       [pycrio.metrics]: per-method counters and latency histogram,
                                   pushed over OTLP every 15 s and served to Prometheus.

The daemons run with the SDK's default batch delay (OTEL_BSP_SCHEDULE_DELAY=5000), as in
production. Per call we record time.perf_counter_ns() around one blocking unary call from a
single client thread, and report p50, p99 and throughput, plus ratios to "disabled".

Why interleaved: on a small, shared machine the noise (CPU frequency, other processes, page
cache) drifts over minutes, and measuring configurations one after the other would bake that
drift into the ratios. Instead every round measures every configuration, in an order rotated
per round, so the drift hits all configurations alike; latencies are pooled across rounds.

Run from the repo root:  .venv/bin/python bench/tracing_overhead.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from pycrio.cri import api_pb2, api_pb2_grpc  # noqa: E402
from tests.harness import PycrioDaemon, tracing_args  # noqa: E402
from tests.otlp_receiver import OTLPReceiver, free_port  # noqa: E402

DISABLED = "disabled"
RATE0 = "rate 0"
UP = "rate 1000000, collector up"
DOWN = "rate 1000000, collector down"
METRICS = "metrics on, tracing off"
CONFIGS = (DISABLED, RATE0, UP, DOWN, METRICS)
METHODS = ("Version", "ListContainers")
WARMUP = 200
# The SDK default batch delay, so the export thread wakes as often as in production.
DAEMON_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "5000"}

Call = Callable[[api_pb2_grpc.RuntimeServiceStub], Any]
CALLS: dict[str, Call] = {
    "Version": lambda stub: stub.Version(api_pb2.VersionRequest(), timeout=10),
    "ListContainers": lambda stub: stub.ListContainers(api_pb2.ListContainersRequest(), timeout=10),
}


@dataclass
class Sample:
    """All latencies of one (method, configuration), pooled over rounds."""

    latencies_ns: list[int] = field(default_factory=list)
    elapsed_ns: int = 0

    @property
    def calls(self) -> int:
        return len(self.latencies_ns)

    def calls_per_s(self) -> float:
        return self.calls / (self.elapsed_ns / 1e9) if self.elapsed_ns else 0.0


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per configuration per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--method", choices=[*METHODS, "both"], default="both", help="CRI method to call")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed calls before each timed loop")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--calls and --rounds must be >= 1, --warmup >= 0")
    return args


def measure(daemon: PycrioDaemon, call: Call, calls: int, warmup: int, sample: Sample) -> None:
    """On a fresh channel: `warmup` untimed calls, then `calls` timed ones appended to `sample`."""
    with grpc.insecure_channel(daemon.endpoint) as channel:
        stub = api_pb2_grpc.RuntimeServiceStub(channel)
        for _ in range(warmup):
            call(stub)
        latencies = [0] * calls
        clock = time.perf_counter_ns
        gc.collect()
        gc.disable()  # keep the client's own GC pauses out of the tail
        try:
            start = clock()
            for i in range(calls):
                t0 = clock()
                call(stub)
                latencies[i] = clock() - t0
            elapsed = clock() - start
        finally:
            gc.enable()
    sample.latencies_ns.extend(latencies)
    sample.elapsed_ns += elapsed


def run(
    daemons: dict[str, PycrioDaemon], methods: list[str], calls: int, rounds: int, warmup: int
) -> dict[str, dict[str, Sample]]:
    """Interleaved rounds per method; the configuration order rotates every round."""
    results = {m: {c: Sample() for c in CONFIGS} for m in methods}
    for method in methods:
        for r in range(rounds):
            order = [CONFIGS[(r + i) % len(CONFIGS)] for i in range(len(CONFIGS))]
            t0 = time.monotonic()
            for config in order:
                measure(daemons[config], CALLS[method], calls, warmup, results[method][config])
            print(f"  {method} round {r + 1}/{rounds} ({time.monotonic() - t0:.1f}s)", file=sys.stderr, flush=True)
    return results


def summarize(samples: dict[str, Sample]) -> dict[str, dict[str, float]]:
    """p50/p99 in µs, calls/s and ratios to "disabled" for each configuration of one method."""
    rows: dict[str, dict[str, float]] = {}
    for config, sample in samples.items():
        ordered = sorted(sample.latencies_ns)
        rows[config] = {
            "calls": sample.calls,
            "p50_us": percentile(ordered, 50) / 1000,
            "p99_us": percentile(ordered, 99) / 1000,
            "calls_per_s": sample.calls_per_s(),
        }
    base = rows[DISABLED]
    for row in rows.values():
        row["p50_ratio"] = row["p50_us"] / base["p50_us"]
        row["p99_ratio"] = row["p99_us"] / base["p99_us"]
    return rows


def checks(rows: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The three overhead targets, measured."""
    targets = [
        ("p50(rate 1000000 up) / p50(disabled)", rows[UP]["p50_us"] / rows[DISABLED]["p50_us"], 1.10),
        ("p50(rate 0) / p50(disabled)", rows[RATE0]["p50_us"] / rows[DISABLED]["p50_us"], 1.02),
        ("p99(collector down) / p99(collector up)", rows[DOWN]["p99_us"] / rows[UP]["p99_us"], 1.10),
        ("p50(metrics on) / p50(disabled)", rows[METRICS]["p50_us"] / rows[DISABLED]["p50_us"], 1.05),
    ]
    return [{"check": name, "value": value, "limit": limit, "pass": value <= limit} for name, value, limit in targets]


def print_method(method: str, rows: dict[str, dict[str, float]], results: list[dict[str, Any]]) -> None:
    """The table and target checks of one method."""
    print(f"\n== {method} ==")
    header = f"{'configuration':<30} {'calls':>7} {'p50 µs':>9} {'p99 µs':>9} {'calls/s':>9} {'p50/dis':>8} {'p99/dis':>8}"
    print(header)
    print("-" * len(header))
    for config, row in rows.items():
        print(
            f"{config:<30} {row['calls']:>7d} {row['p50_us']:>9.1f} {row['p99_us']:>9.1f} "
            f"{row['calls_per_s']:>9.0f} {row['p50_ratio']:>8.3f} {row['p99_ratio']:>8.3f}"
        )
    print("targets:")
    for check in results:
        verdict = "PASS" if check["pass"] else "MISS"
        print(f"  {check['check']:<42} = {check['value']:.3f}  (<= {check['limit']:.2f})  {verdict}")


def main(argv: list[str] | None = None) -> int:
    """Start the receiver and four daemons, measure, print; exit 0 whatever the numbers."""
    args = parse_args(argv)
    # A SIGTERM (CI timeout, kill) unwinds like Ctrl-C, so the finally blocks stop the daemons.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    methods = list(METHODS) if args.method == "both" else [args.method]
    print(
        f"pycrio tracing overhead: {args.calls} calls x {args.rounds} rounds per configuration, "
        f"warm-up {args.warmup}, methods {', '.join(methods)}"
    )
    print(f"python {platform.python_version()}, grpc {grpc.__version__}, {os.cpu_count()} CPUs, {platform.platform()}")

    receiver = OTLPReceiver().start()
    daemons: dict[str, PycrioDaemon] = {}
    pids: dict[str, int] = {}
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="pycrio-bench-") as tmp:
            base = Path(tmp)
            daemon_args = {
                DISABLED: ["--log-level", "info"],
                RATE0: tracing_args(receiver.endpoint, rate=0),
                UP: tracing_args(receiver.endpoint, rate=1_000_000),
                DOWN: tracing_args(f"127.0.0.1:{free_port()}", rate=1_000_000),
                METRICS: ["--log-level", "info"],
            }
            config_text = {
                METRICS: (
                    "[pycrio.metrics]\nenable_metrics = true\n"
                    f'metrics_endpoint = "{receiver.endpoint}"\nmetrics_port = {free_port()}\n'
                ),
            }
            try:
                for i, config in enumerate(CONFIGS):
                    daemon = PycrioDaemon(
                        base / f"d{i}", args=daemon_args[config], env=DAEMON_ENV, config_text=config_text.get(config, "")
                    )
                    daemons[config] = daemon
                    daemon.start()
                    assert daemon.proc is not None
                    pids[config] = daemon.proc.pid
                results = run(daemons, methods, args.calls, args.rounds, args.warmup)
            finally:
                # SIGTERM makes each daemon flush its queued spans before exiting.
                exit_codes = {config: daemon.stop() for config, daemon in daemons.items()}
    finally:
        spans = receiver.spans()
        receiver.stop()
    duration = time.monotonic() - started

    report: dict[str, Any] = {
        "parameters": {"calls": args.calls, "rounds": args.rounds, "warmup": args.warmup, "methods": methods,
                       "daemon_env": DAEMON_ENV},
        "methods": {},
    }
    for method in methods:
        rows = summarize(results[method])
        method_checks = checks(rows)
        print_method(method, rows, method_checks)
        report["methods"][method] = {"configurations": rows, "checks": method_checks}

    # Spans per daemon, told apart by the process.pid resource attribute.
    per_call = len(methods) * args.rounds * (args.warmup + args.calls)
    expected = {DISABLED: 0, RATE0: 0, UP: per_call + 1, DOWN: 0}  # +1: start()'s readiness Version
    received = {config: sum(1 for s in spans if s.resource.get("process.pid") == pid) for config, pid in pids.items()}
    print(f"\nspans received: {len(spans)} in total")
    for config in CONFIGS:
        print(f"  {config:<30} {received.get(config, 0):>7d}  (expected {expected[config]})")
    print(f"daemon exit codes: {', '.join(f'{c}={code}' for c, code in exit_codes.items())}")
    print(f"total time {duration:.1f}s")
    report["spans"] = {"total": len(spans), "received": received, "expected": expected}
    report["exit_codes"] = exit_codes
    report["duration_s"] = duration

    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
