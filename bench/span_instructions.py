"""Instructions per CRI call spent on tracing, counted by valgrind: exact where CPU time is noise.

The daemon benches (`tracing_overhead.py`) read CPU time, whose spread between runs (about
+-10 us per call on this 2-core machine) is larger than most single changes to the span path.
This bench counts instructions instead, which are the same run after run for the same code and
inputs (callgrind, `--separate-threads=yes`, the calling thread's count only; PYTHONHASHSEED
fixed), so a change of a few hundred instructions per call shows.

What runs (in a child process, under `valgrind --tool=callgrind`): pycrio's own
`CRIServerInterceptor` around a ListContainers handler that returns an empty reply, called
directly with the request and a ServicerContext stand-in whose metadata is what gRPC hands the
handler (user-agent, and a sampled W3C `traceparent` where a mode has one; modes without one get
a header of the same size, so every mode handles the same metadata). Tracing is the daemon's:
`pycrio.tracing.Tracing` with the SDK TracerProvider, pycrio's samplers, span processors and
the `log` event handler on the root logger. The batch delay and batch size are set so that no
export starts during the calls; `encode` then encodes the queued spans on the calling thread, in
batches of 512, as the export thread would (pycrio's OTLP encoder, without the gRPC send).

Modes (instructions per call, the difference between a run of `--calls` calls and one of none,
each after the same warm-up):
  off          tracing disabled (no span objects)
  rate0        enabled at rate 0, no parent: no span (kubelet's calls without tracing)
  traced       rate 0, a sampled parent: one SERVER span (kubelet's calls with tracing), made after
               the call (pycrio.tracing.call_span): what the call's thread does
  eager        as traced, with PYCRIO_TRACING_CALL_SPANS=eager: the span made on the call's thread
  traced-log   as traced, and the handler logs one INFO line: one `log` event
  steps        as traced-log, and the handler opens STEPS step spans one after another, each with
               one attribute (a mutating call: RunPodSandbox, CreateContainer...); printed per step
               as the difference to traced-log
  steps-make   as steps, plus making what the calls left to be made after them (as make)
  root         rate 1000000, no parent: a new trace per call
  down         as traced, with the default queue bound and batch size and no collector: the queue
               is full and the export thread failing (its timing varies: not exact)
  make         as traced, plus making the calls' spans after them, on the calling thread as the
               export thread would: printed per span as the difference to traced
  encode       as make, plus encoding the spans: export-thread instructions per span (printed
               as the difference to make)

Hot caches: these are instructions, not the CPU time the daemon pays per instruction (5-6x
more there: gRPC's threads and the GIL between calls). Use it to compare code.

`--daemon` counts a whole daemon instead (`python -m pycrio` under callgrind, every thread,
tracing on at rate 0, no export during the counted blocks): blocks of `--calls` ListContainers
over its socket without and with a sampled `traceparent`, alternating, two of each, counted with
callgrind_control between blocks. Printed: instructions per call of each kind and their ratio,
the daemon-level form of the issue's "p50 traced / untraced", exact: everything gRPC and the
daemon do per call is in it, the client is not.

`--daemon-pods N` counts whole pod lives the same way (as root: a registry on loopback, a CNI
bridge of its own, real runc and conmon, which callgrind does not count): N untraced and N traced
lives alternating (the seven calls of bench/tracing_overhead.py's pod group, every call of a
traced life with a sampled `traceparent`), each counted alone. Printed: the median per life of
each kind, the extra of a traced life, and the spread; the work a traced life leaves to the
export thread (its spans made after their calls, encoded) is not in it: `make` and `encode`
give that per span. Pod-life CPU time spreads by more than a millisecond between pairs of lives
(bench/tracing_overhead.py); this count is steady to a few percent.

Run from the repo root:  .venv/bin/python bench/span_instructions.py [--calls 500]
                             [--modes off,rate0,traced,...] [--daemon] [--daemon-pods N]
                             [--baseline-src DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODES = ("off", "rate0", "traced", "eager", "traced-log", "steps", "steps-make", "root", "down", "make", "encode")
METHOD = "/runtime.v1.RuntimeService/ListContainers"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
WARM_UP = 200
ENCODE_BATCH = 512
STEPS = 3  # step spans per call in the `steps` modes, each with one attribute (as pycrio's are)
REPORT_ENV = "SPAN_INSTRUCTIONS_REPORT"


# -- the child: one run of calls --------------------------------------------------------------
Metadatum = namedtuple("Metadatum", "key value")


class HandlerContext:
    """What the interceptor reads of a grpc.ServicerContext on a call that succeeds."""

    def __init__(self, metadata: tuple[Metadatum, ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        return self._metadata

    def code(self) -> None:
        return None


def child(mode: str, calls: int) -> None:
    """Make `calls` calls after the warm-up (and, for `encode`, encode their spans)."""
    import grpc

    from pycrio.config.schema import TracingConfig
    from pycrio.cri import api_pb2
    from pycrio.tracing.interceptor import CRIServerInterceptor
    from pycrio.tracing.logs import SpanEventHandler
    from pycrio.tracing.otlp_encode import SpanEncoder
    from pycrio.tracing import step_span
    from pycrio.tracing.provider import Tracing

    if mode == "eager":
        os.environ["PYCRIO_TRACING_CALL_SPANS"] = "eager"  # pycrio.tracing.pipeline.CALL_SPANS_ENV
    config = TracingConfig(
        enable_tracing=mode != "off",
        tracing_endpoint="127.0.0.1:9",  # never reached: nothing is exported while counting
        tracing_sampling_rate_per_million=1_000_000 if mode == "root" else 0,
    )
    tracing = Tracing(config)
    root = logging.getLogger()
    root.addHandler(SpanEventHandler())
    root.setLevel(logging.INFO)
    handler_log = logging.getLogger("pycrio.bench")
    reply = api_pb2.ListContainersResponse()
    say = mode in ("traced-log", "steps", "steps-make")
    steps = STEPS if mode in ("steps", "steps-make") else 0

    def list_containers(request: Any, context: Any) -> Any:
        if say:
            handler_log.info("listed %d containers", 0)
        for _ in range(steps):
            with step_span("runtime_create", **{"container.id": "c0"}):
                pass
        return reply

    interceptor = CRIServerInterceptor(tracing)
    details = type("Details", (), {"method": METHOD})()
    unary = interceptor.intercept_service(
        lambda _: grpc.unary_unary_rpc_method_handler(list_containers), details
    ).unary_unary
    parent = mode in ("traced", "eager", "traced-log", "steps", "steps-make", "down", "make", "encode")
    header = Metadatum("traceparent", TRACEPARENT) if parent else Metadatum("x-bench-pad", "0" * len(TRACEPARENT))
    context = HandlerContext((Metadatum("user-agent", "grpc-go/1.70.0"), header))
    request = api_pb2.ListContainersRequest()
    batch = tracing.pipeline.batch if tracing.pipeline is not None else None
    if mode == "down" and batch is not None:  # the default bounds: the queue fills, the thread is woken
        batch.max_queue_size, batch.max_export_batch_size = 2048, 512
        batch._queue = collections.deque(maxlen=2048)
    for _ in range(WARM_UP):
        unary(request, context)
    make_deferred = getattr(batch, "_make_deferred", None)  # spans made after their calls (not in older trees)
    if batch is not None and mode != "down":
        if make_deferred is not None:
            make_deferred()  # the making path warmed up too
        batch._queue.clear()
    for _ in range(calls):
        unary(request, context)
    if make_deferred is not None and (mode in ("make", "steps-make", "encode") or REPORT_ENV in os.environ):
        make_deferred()  # what the export thread does before an export
    spans = list(batch._queue) if batch is not None and (mode == "encode" or REPORT_ENV in os.environ) else []
    if REPORT_ENV in os.environ:  # for tests/test_bench_span_instructions.py, outside the counted runs
        names = collections.Counter(span.name for span in spans)
        print(f"spans queued: {len(spans)}, log events: {sum(len(span.events) for span in spans)}, names: {dict(names)}")
    if mode == "encode":
        encoder = SpanEncoder()
        for start in range(0, len(spans), ENCODE_BATCH):
            encoder.encode_request(spans[start : start + ENCODE_BATCH])
    sys.stdout.flush()
    os._exit(0)  # no shutdown: it would export


# -- the parent: runs children under valgrind ------------------------------------------------
def valgrind_prefix() -> list[str]:
    """callgrind, a count per thread, at fixed addresses (object addresses feed id-based hashes:
    the same addresses, the same count)."""
    no_aslr = ["setarch", os.uname().machine, "--addr-no-randomize"] if shutil.which("setarch") else []
    return [*no_aslr, "valgrind", "--tool=callgrind", "--separate-threads=yes"]


def counted_env(src: Path) -> dict[str, str]:
    """The environment of a counted process: pycrio from `src`, fixed hashes, and a batch
    processor that exports nothing while the calls are counted."""
    return {
        "PYTHONPATH": str(src),
        "PYTHONHASHSEED": "0",
        "OTEL_BSP_SCHEDULE_DELAY": "3600000",
        "OTEL_BSP_MAX_QUEUE_SIZE": str(1 << 20),
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": str(1 << 20),
        "PYCRIO_TRACING_RELAY": "off",
    }


def count(mode: str, calls: int, src: Path, out_dir: Path) -> int:
    """The calling thread's instruction count of one child run."""
    prefix = out_dir / f"{mode}.{calls}.{abs(hash(str(src)))}"
    env = {**os.environ, **counted_env(src)}
    for name in ("OTEL_TRACES_SAMPLER", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT"):
        env.pop(name, None)
    run = subprocess.run(
        [
            *valgrind_prefix(), f"--callgrind-out-file={prefix}", sys.executable, __file__, "--child", mode, str(calls),
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    if run.returncode != 0:
        raise RuntimeError(f"{mode} ({calls} calls) failed: {run.stderr[-2000:]}")
    main_thread = Path(f"{prefix}-01")
    match = re.search(r"^summary: (\d+)$", main_thread.read_text(), re.M)
    if match is None:
        raise RuntimeError(f"no summary in {main_thread}")
    return int(match.group(1))


def per_call(mode: str, calls: int, src: Path, out_dir: Path) -> float:
    return (count(mode, calls, src, out_dir) - count(mode, 0, src, out_dir)) / calls


def daemon_counts(calls: int, src: Path, base: Path) -> dict[str, float]:
    """Instructions per ListContainers call of a whole daemon, untraced and traced (see the docstring)."""
    sys.path.insert(0, str(REPO))
    import grpc

    from pycrio.cri import api_pb2
    from tests.harness import PycrioDaemon

    class CountedDaemon(PycrioDaemon):
        def command(self, *extra: str) -> list[str]:
            return [
                *valgrind_prefix(), "--instr-atstart=no", f"--callgrind-out-file={self.base / 'callgrind.out'}",
                *super().command(*extra),
            ]

    config = (
        "[pycrio.tracing]\nenable_tracing = true\n"
        'tracing_endpoint = "127.0.0.1:9"\ntracing_sampling_rate_per_million = 0\n'
    )
    daemon = CountedDaemon(base, config_text=config, env=counted_env(src)).start(timeout=600)
    assert daemon.proc is not None
    pid = str(daemon.proc.pid)
    traced = (("traceparent", TRACEPARENT),)
    blocks = [("untraced", ()), ("traced", traced), ("untraced", ()), ("traced", traced)]
    totals: dict[str, list[float]] = {"untraced": [], "traced": []}
    try:
        with grpc.insecure_channel(daemon.endpoint) as channel:
            list_containers = channel.unary_unary(
                "/runtime.v1.RuntimeService/ListContainers",
                request_serializer=api_pb2.ListContainersRequest.SerializeToString,
                response_deserializer=api_pb2.ListContainersResponse.FromString,
            )
            request = api_pb2.ListContainersRequest()
            for _ in range(WARM_UP // 2):
                list_containers(request, timeout=60)
                list_containers(request, timeout=60, metadata=traced)
            for number, (kind, metadata) in enumerate(blocks, 1):
                subprocess.run(["callgrind_control", "--instr=on", pid], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                subprocess.run(["callgrind_control", "--zero", pid], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for _ in range(calls):
                    list_containers(request, timeout=60, metadata=metadata)
                subprocess.run(["callgrind_control", f"--dump=block{number}", pid], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                subprocess.run(["callgrind_control", "--instr=off", pid], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                total = 0
                for dump in base.glob(f"callgrind.out.{number}-*"):
                    match = re.search(r"^totals: (\d+)", dump.read_text(errors="replace"), re.M)
                    total += int(match.group(1)) if match else 0
                totals[kind].append(total / calls)
    finally:
        daemon.stop()
    untraced, traced_count = min(totals["untraced"]), min(totals["traced"])
    return {"untraced": untraced, "traced": traced_count, "ratio": traced_count / untraced,
            "spread": max(max(v) - min(v) for v in totals.values())}


POD_BRIDGE = "pycriosib0"  # the pod lives' own network: no other bench or test uses these
POD_SUBNET = "10.152.0.0/24"


def _dump_total(base: Path, number: int) -> int:
    """Instructions of every thread in callgrind dump `number` (written by callgrind_control --dump)."""
    total = 0
    for dump in base.glob(f"callgrind.out.{number}-*"):
        match = re.search(r"^totals: (\d+)", dump.read_text(errors="replace"), re.MULTILINE)
        total += int(match.group(1)) if match else 0
    return total


def daemon_pod_counts(lives: int, src: Path, base: Path) -> dict[str, Any]:
    """Instructions of a whole daemon per pod life, untraced and traced (see the docstring)."""
    sys.path.insert(0, str(REPO))
    import importlib.util

    from tests.cni_fixture import bridge_network
    from tests.harness import PycrioDaemon
    from tests.registry_fixture import ImageBuilder, TestRegistry

    spec = importlib.util.spec_from_file_location("tracing_overhead", REPO / "bench" / "tracing_overhead.py")
    assert spec is not None and spec.loader is not None
    overhead = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = overhead  # (its dataclasses look their module up)
    spec.loader.exec_module(overhead)  # its pod group: the same seven calls as its paired pod phase
    from pycrio.cri import api_pb2

    class CountedDaemon(PycrioDaemon):
        def command(self, *extra: str) -> list[str]:
            return [
                *valgrind_prefix(), "--instr-atstart=no", f"--callgrind-out-file={self.base / 'callgrind.out'}",
                *super().command(*extra),
            ]

    cgroup_parent = f"/pycrio-span-instructions-{os.getpid()}"
    registry = TestRegistry(base / "registry").start()
    daemon = None
    try:
        image = ImageBuilder(base / "images", registry).busybox("bench/instr-busybox", "1").reference
        netdir = bridge_network(base / "net.d", "pycrio-span-instructions", POD_BRIDGE, POD_SUBNET, ipam_dir=base / "ipam")
        config = (
            "[pycrio.tracing]\nenable_tracing = true\n"
            'tracing_endpoint = "127.0.0.1:9"\ntracing_sampling_rate_per_million = 0\n'
            f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
            f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
            f'[pycrio.runtime]\npod_cgroup_parent = "{cgroup_parent}"\n'
        )
        daemon = CountedDaemon(base / "daemon", config_text=config, env=counted_env(src)).start(timeout=600)
        assert daemon.proc is not None
        pid = str(daemon.proc.pid)
        with daemon.channel() as channel:
            stub = daemon.runtime(channel)
            daemon.images(channel).PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=600)
            failed = overhead.PhaseResult()
            for traced in (False, True):  # warm-up: both paths, first calls, caches
                overhead.pod_group(stub, image, base / "logs", failed, overhead.traceparent if traced else tuple)
            counts: dict[str, list[int]] = {"untraced": [], "traced": []}
            for number in range(1, 2 * lives + 1):
                traced = number % 2 == 0
                subprocess.run(["callgrind_control", "--instr=on", pid], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                subprocess.run(["callgrind_control", "--zero", pid], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                overhead.pod_group(stub, image, base / "logs", failed, overhead.traceparent if traced else tuple)
                subprocess.run(["callgrind_control", f"--dump=life{number}", pid], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                subprocess.run(["callgrind_control", "--instr=off", pid], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                counts["traced" if traced else "untraced"].append(_dump_total(base / "daemon", number))
                print(f"    pod life {number}/{2 * lives} ({'traced' if traced else 'untraced'}): "
                      f"{counts['traced' if traced else 'untraced'][-1] / 1e6:.2f} M instructions", flush=True)
            if failed.errors:
                raise RuntimeError(f"{len(failed.errors)} pod lives failed, the first: {failed.errors[0]}")
    finally:
        if daemon is not None:
            daemon.stop(timeout=120)
        registry.stop()
        _clean_up_pods(base, cgroup_parent)
    untraced, traced_counts = sorted(counts["untraced"]), sorted(counts["traced"])
    return {
        "lives": lives,
        "untraced": untraced[len(untraced) // 2],  # the medians
        "traced": traced_counts[len(traced_counts) // 2],
        "extra": traced_counts[len(traced_counts) // 2] - untraced[len(untraced) // 2],
        "extra_min": traced_counts[0] - untraced[0],  # the quietest life of each kind (no collection of the GC's in it)
        "spread": max(untraced[-1] - untraced[0], traced_counts[-1] - traced_counts[0]),
    }


def _clean_up_pods(base: Path, cgroup_parent: str) -> None:
    """What the pod lives may leave on the host: mounts below `base`, the bridge, the cgroup parent."""
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        if str(base) in line:
            subprocess.run(["umount", "-l", line.split()[4]], capture_output=True, check=False)
    subprocess.run(["ip", "link", "delete", POD_BRIDGE], capture_output=True, check=False)
    from pycrio.oci import cgroups

    try:
        cgroups.remove_cgroup(cgroup_parent)
    except OSError as exc:
        print(f"cgroup parent {cgroup_parent} left: {exc}", file=sys.stderr)


def print_daemon_pods(results: dict[str, dict[str, Any]]) -> None:
    print("\nwhole daemon, instructions per pod life (7 calls; every thread; the export thread's share after the"
          " lives is not in it):")
    print(f"{'tree':10s}{'lives':>7s}{'untraced':>14s}{'traced':>14s}{'extra':>12s}{'per call':>10s}{'ratio':>8s}"
          f"{'extra min':>12s}{'spread':>12s}")
    for tree, row in results.items():
        print(f"{tree:10s}{row['lives']:7d}{row['untraced']:14.0f}{row['traced']:14.0f}{row['extra']:12.0f}"
              f"{row['extra'] / 7:10.0f}{row['traced'] / row['untraced']:8.3f}{row['extra_min']:12.0f}{row['spread']:12.0f}")
    print("(medians of each kind; extra min: the fewest traced less the fewest untraced; spread: the largest difference"
          " between two lives of the same kind, mostly a collection of the GC's falling in one)")


def print_daemon(results: dict[str, dict[str, float]]) -> None:
    print("\nwhole daemon, instructions per ListContainers call (every thread; no export in the blocks):")
    print(f"{'tree':10s}{'untraced':>12s}{'traced':>12s}{'extra':>10s}{'ratio':>8s}{'spread':>9s}")
    for tree, row in results.items():
        print(f"{tree:10s}{row['untraced']:12.0f}{row['traced']:12.0f}{row['traced'] - row['untraced']:10.0f}"
              f"{row['ratio']:8.3f}{row['spread']:9.0f}")
    print("(spread: the largest difference between two blocks of the same kind)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per counted run (default 500)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--daemon", action="store_true", help="also count a whole daemon (traced / untraced calls)")
    parser.add_argument("--daemon-pods", type=int, default=0, metavar="N",
                        help="also count N untraced and N traced pod lives of a whole daemon (root)")
    parser.add_argument("--baseline-src", type=Path, metavar="DIR", help="also count the pycrio in DIR (an older src/)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "CALLS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        print(f"unknown modes: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.daemon_pods < 0:
        print("--daemon-pods N: N >= 0", file=sys.stderr)
        return 2
    if args.daemon_pods and os.geteuid() != 0:
        print("--daemon-pods runs pods (network namespaces, cgroups, mounts): run it as root", file=sys.stderr)
        return 2
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    trees = {"now": REPO / "src"}
    if args.baseline_src is not None:
        trees["baseline"] = args.baseline_src.resolve()
    results: dict[str, dict[str, float]] = {tree: {} for tree in trees}
    daemon_results: dict[str, dict[str, float]] = {}
    pod_results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="pycrio-bench-instr-") as tmp:  # (make clean-test-state knows pycrio-bench-*)
        # Each tree is counted from a copy at a path of the same length: where the trees lie
        # moves a call's count by about 2 k instructions (the same code, from the repo and
        # from /tmp), more than the bench resolves.
        for number, (tree, src) in enumerate(trees.items()):
            trees[tree] = shutil.copytree(src, Path(tmp) / f"tree{number}" / "src", ignore=shutil.ignore_patterns("__pycache__"))
        if args.daemon:
            for tree, src in trees.items():
                started = time.monotonic()
                daemon_results[tree] = daemon_counts(args.calls, src, Path(tmp) / f"daemon-{tree}")
                print(f"  {tree:8s} daemon     {daemon_results[tree]['ratio']:9.3f} traced/untraced"
                      f"  ({time.monotonic() - started:.0f} s)", flush=True)
        if args.daemon_pods:
            for tree, src in trees.items():
                started = time.monotonic()
                pod_results[tree] = daemon_pod_counts(args.daemon_pods, src, Path(tmp) / f"pods-{tree}")
                print(f"  {tree:8s} pod lives  {pod_results[tree]['extra'] / 1e3:9.0f} k instructions more traced"
                      f"  ({time.monotonic() - started:.0f} s)", flush=True)
        for mode in modes:
            for tree, src in trees.items():
                started = time.monotonic()
                results[tree][mode] = per_call(mode, args.calls, src, Path(tmp))
                print(f"  {tree:8s} {mode:10s} {results[tree][mode]:9.0f} instructions/call"
                      f"  ({time.monotonic() - started:.0f} s)", flush=True)
    if modes:
        print(f"\ninstructions per call ({args.calls} calls, hot caches; tracing cost = mode - off):")
        header = f"{'mode':12s}" + "".join(f"{tree:>12s}{'-off':>10s}" for tree in trees)
        if len(trees) == 2:
            header += f"{'now-base':>10s}"
        print(header)
        for mode in modes:
            line = f"{mode:12s}"
            for tree in trees:
                value = results[tree][mode]
                off = results[tree].get("off")
                line += f"{value:12.0f}" + (f"{value - off:10.0f}" if off is not None else f"{'':10s}")
            if len(trees) == 2:
                line += f"{results['now'][mode] - results['baseline'][mode]:10.0f}"
            print(line)
    for tree in trees:
        got = results[tree]
        if "make" in modes and "traced" in modes:
            print(f"{tree}: making a span after its call (export thread), per span: {got['make'] - got['traced']:.0f} instructions")
        if "steps" in modes and "traced-log" in modes:
            print(f"{tree}: one step span on the request thread: {(got['steps'] - got['traced-log']) / STEPS:.0f} instructions")
        if "steps-make" in modes and "steps" in modes:
            print(f"{tree}: making a call's step spans after the call, per step: {(got['steps-make'] - got['steps']) / STEPS:.0f} instructions")
        if "encode" in modes and "make" in modes:
            print(f"{tree}: encoding, per span: {got['encode'] - got['make']:.0f} instructions")
        elif "encode" in modes and "traced" in modes:
            print(f"{tree}: making after the call and encoding, per span: {got['encode'] - got['traced']:.0f} instructions")
    if daemon_results:
        print_daemon(daemon_results)
    if pod_results:
        print_daemon_pods(pod_results)
    if args.json is not None:
        args.json.write_text(
            json.dumps({"calls": args.calls, "instructions_per_call": results, "daemon": daemon_results,
                        "daemon_pod_lives": pod_results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
