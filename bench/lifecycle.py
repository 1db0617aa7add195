"""Lifecycle benchmark of pycrio: p50/p99 of every pod and container CRI call, tracing off vs on,
against the floor of plain `runc` on an equivalent bundle, where pod start time goes, and the
"pod" runtime handler (one pycrio-monitor per pod) against "oci" (conmon per container).

What is measured, all in one run on this host:

1. Two daemons side by side, one registry (docker-registry on 127.0.0.1) serving the busybox test
   image, pulled into both daemons before anything is timed:
     "tracing off"  no tracing at all;
     "tracing on"   tracing at rate 1000000 (every call a sampled span) to a live in-process
                    OTLP/gRPC receiver, with the SDK's production batch delay (5 s).
   For each of N pods, on each daemon, the client-side latency (time.perf_counter_ns around one
   blocking unary gRPC call over the unix socket, one client thread, one long-lived channel per
   daemon) of the nine calls kubelet makes over a pod's life:
     RunPodSandbox, CreateContainer (busybox `sleep 1000`), StartContainer, ContainerStatus,
     ExecSync (`/bin/busybox true`: the test image has no `true` applet link), StopContainer
     (timeout 0, see below), RemoveContainer, StopPodSandbox, RemovePodSandbox.
   Pods look like kubelet's: network and IPC namespaces per pod, PID namespace per container
   (kubelet's default; a CRI message left at its zero value would ask for a shared PID namespace
   and so an extra catatonit infra process per pod).
   StopContainer uses timeout 0 (SIGKILL at once): `sleep` runs as PID 1 of its PID namespace,
   and PID 1 ignores SIGTERM when it has no handler, so any timeout T > 0 would just measure
   T seconds of waiting for the SIGKILL that follows.
2. The floor, plain runc on one OCI bundle made like pycrio's: the busybox rootfs copied from the
   layer the daemon unpacked, `runc spec` edited (terminal false, an explicit cgroupsPath under
   the bench cgroup parent), runc state in a temp --root:
     "runc run"            `runc run --bundle B ID` of `/bin/true`: create + start + wait + delete;
     "runc create/start/delete -f"  the same bundle running `/bin/sleep 1000` (like the pods'
                           container, so `delete -f` kills a running process as StopContainer(0)
                           + RemoveContainer do), each command timed as a subprocess.
   The floor has no conmon, no CNI, no pod namespaces, no image/rootfs work and no gRPC: it is
   what any runc-based runtime pays at the least.

3. With `--handlers oci,pod` (the default): a third daemon, "pod handler", configured like
   "tracing off" but with its default handler "runc" of runtime_type "pod" (one pycrio-monitor per
   pod, forked from the runroot's zygote, owns the pod's containers; see src/pycrio/oci/runtime_pod.py).
   The same nine timed calls per pod; its table sets it against "tracing off" (the "oci" handler:
   conmon + runc per container) call by call, with the targets of issue 13: "pod" no slower than
   "oci" on ExecSync and StartContainer (p50). On these two daemons each pod also gets 4 more
   ExecSync calls after the first (a row of their own: kubelet's exec probes are later execs).
   `--handlers oci` leaves the third daemon out.

Why interleaved: pod i runs on daemon "off", then "on", then "pod handler" (the other way round for
odd i), and floor round i runs right after (odd i: right before), so drift (page cache, CPU
frequency, other processes) hits all of them alike. One untimed warm-up pod per daemon and one untimed floor round
come first (the first CNI ADD makes the bridge, first calls warm caches).

From the tracing daemon's spans: the number received per timed call against what was called, and
for RunPodSandbox and CreateContainer (the two calls pod start is made of) the child spans of the
median call (name -> ms, and what no child span covers), plus the p50 of every child step over all
timed calls of every method.

Afterwards (before cleaning up) the host is checked for leaks: pods or containers still listed,
mounts under the bench dir, conmon processes, runc containers, pod cgroups, veths on the bench
bridge, iptables rules for the bench subnet, host-local IP reservations, pycrio-monitor processes
of the "pod" daemon (its zygote aside, stopped with the daemon). Then everything goes: pods (rmp -f),
daemons (and the zygote), the registry, the bridge, the host-local state dir, the cgroup parent.

Run from the repo root, as root:
  .venv/bin/python bench/lifecycle.py [--pods N] [--handlers oci,pod] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import secrets
import shutil
import signal
import subprocess
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
from pycrio.oci import cgroups  # noqa: E402
from pycrio.procfs import all_pids, argv  # noqa: E402
from tests.cni_fixture import bridge_network  # noqa: E402
from tests.harness import PycrioDaemon, tracing_args  # noqa: E402
from tests.otlp_receiver import OTLPReceiver, ReceivedSpan, union_ns  # noqa: E402
from tests.registry_fixture import ImageBuilder, TestRegistry  # noqa: E402

OFF = "tracing off"
ON = "tracing on"
CONFIGS = (OFF, ON)
FLOOR = "runc floor"
POD = "pod handler"  # the third daemon: default handler of runtime_type "pod", tracing off
OCI_LABEL = '"oci"'  # the "tracing off" daemon, as the pod table calls it
POD_LABEL = '"pod"'
HANDLER_CHOICES = ("oci", "pod")

CALLS = (
    "RunPodSandbox",
    "CreateContainer",
    "StartContainer",
    "ContainerStatus",
    "ExecSync",
    "StopContainer",
    "RemoveContainer",
    "StopPodSandbox",
    "RemovePodSandbox",
)
RUNTIME_SERVICE = "/runtime.v1.RuntimeService/"
POD_START = ("RunPodSandbox", "CreateContainer", "StartContainer")
TEARDOWN = ("StopContainer", "RemoveContainer", "StopPodSandbox", "RemovePodSandbox")
TOTALS = {
    "pod start (Run+Create+Start)": POD_START,
    "teardown (StopC+RmC+StopP+RmP)": TEARDOWN,
    "whole lifecycle (9 calls)": CALLS,
}
POD_START_TOTAL = "pod start (Run+Create+Start)"
LIFECYCLE_TOTAL = "whole lifecycle (9 calls)"
BREAKDOWN_CALLS = ("RunPodSandbox", "CreateContainer")
HANDLER_CALLS = ("RunPodSandbox", "CreateContainer", "StartContainer", "ExecSync", "StopContainer", "RemoveContainer")
HANDLER_TOTALS = {POD_START_TOTAL: POD_START, LIFECYCLE_TOTAL: CALLS}
HANDLER_TARGET_CALLS = ("ExecSync", "StartContainer")  # "pod" p50 <= "oci" p50 (issue 13)
REPEAT_EXECS = 4  # per pod on the handler daemons, after the first ExecSync
REPEAT_EXEC_ROW = f"ExecSync, the {REPEAT_EXECS} after"

RUNC_RUN = "runc run (/bin/true)"
RUNC_CREATE = "runc create (sleep)"
RUNC_START = "runc start"
RUNC_DELETE = "runc delete -f"
RUNC_CREATE_START = "runc create+start"
RUNC_CREATE_START_DELETE = "runc create+start+delete -f"
FLOOR_ROWS = (RUNC_RUN, RUNC_CREATE, RUNC_START, RUNC_DELETE, RUNC_CREATE_START, RUNC_CREATE_START_DELETE)

BRIDGE = "pycriombh0"
SUBNET = "10.147.0.0/24"
NETWORK_NAME = "pycrio-bench"
HOST_LOCAL_DIR = Path("/var/lib/cni/networks") / NETWORK_NAME
CGROUP_FS = Path("/sys/fs/cgroup")

CONTAINER_COMMAND = ["/bin/sleep", "1000"]
EXEC_COMMAND = ["/bin/busybox", "true"]
STOP_TIMEOUT = 0
RPC_TIMEOUT = 60.0
WARMUP_PODS = 1
# The SDK default batch delay, so the export thread wakes as often as in production.
DAEMON_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "5000"}
TRACING_RATIO_LIMIT = 1.10

Stub = api_pb2_grpc.RuntimeServiceStub


# -- statistics ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def stats_ms(values_ns: list[int]) -> dict[str, float]:
    ms = [v / 1e6 for v in values_ns]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "min_ms": min(ms) if ms else math.nan,
        "max_ms": max(ms) if ms else math.nan,
    }


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


# -- options ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=50, help="timed pods per daemon (and timed floor rounds)")
    parser.add_argument(
        "--handlers", default="oci,pod",
        help='comma-separated: "oci" (the tracing off/on daemons, always measured) and "pod" (a third daemon whose '
        'default handler is of runtime_type "pod", against "oci"); default: %(default)s',
    )  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.pods < 1:
        parser.error("--pods must be >= 1")
    handlers = [h.strip() for h in args.handlers.split(",") if h.strip()]
    unknown = [h for h in handlers if h not in HANDLER_CHOICES]
    if unknown:
        parser.error(f"--handlers: unknown {unknown} (choose from {', '.join(HANDLER_CHOICES)})")
    if "oci" not in handlers:
        parser.error('--handlers must include oci: the tracing part runs on it and "pod" is measured against it')
    args.with_pod = "pod" in handlers
    return args


# -- pods ------------------------------------------------------------------------------------


def conflist(directory: Path) -> Path:
    """The bench CNI network: its own bridge and subnet, shared by the daemons (host-local locks)."""
    return bridge_network(directory, NETWORK_NAME, BRIDGE, SUBNET, portmap="portmap", hairpin=True,
                          filename="10-bench.conflist")  # fmt: skip


def pod_config(name: str, uid: str, log_dir: Path) -> api_pb2.PodSandboxConfig:
    """A pod as kubelet sends it: own network and IPC namespaces, PID namespace per container."""
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="bench", uid=uid, attempt=0),
        hostname=name,
        log_directory=str(log_dir),
        linux=api_pb2.LinuxPodSandboxConfig(
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(
                    network=api_pb2.POD, pid=api_pb2.CONTAINER, ipc=api_pb2.POD
                )
            )
        ),
    )


def container_config(image: str) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="sleeper", attempt=0),
        image=api_pb2.ImageSpec(image=image),
        command=CONTAINER_COMMAND,
        log_path="sleeper.log",
        linux=api_pb2.LinuxContainerConfig(
            security_context=api_pb2.LinuxContainerSecurityContext(
                namespace_options=api_pb2.NamespaceOption(
                    network=api_pb2.POD, pid=api_pb2.CONTAINER, ipc=api_pb2.POD
                )
            )
        ),
    )


@dataclass
class PodRun:
    """One pod's life on one daemon: latency per call, and what went wrong if anything."""

    latencies_ns: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # "<call>: <code>: <details>" of the first failed call
    anomalies: list[str] = field(default_factory=list)  # answered OK but not as expected
    wall_start_ns: int = 0  # time.time_ns() before the first call (to tell warm-up spans apart)
    repeat_execs_ns: list[int] = field(default_factory=list)  # ExecSync calls after the first


def lifecycle(stub: Stub, image: str, name: str, uid: str, log_dir: Path, repeat_execs: int = 0) -> PodRun:
    """The nine calls in kubelet's order, each timed; the first failure ends the pod (cleaned up).
    `repeat_execs` more ExecSync calls follow the first (timed apart: kubelet's exec probes)."""
    run = PodRun(wall_start_ns=time.time_ns())
    clock = time.perf_counter_ns
    sandbox = pod_config(name, uid, log_dir)
    pod_id = ""
    current = ""

    def timed(call: str, invoke: Callable[[], Any]) -> Any:
        nonlocal current
        current = call
        t0 = clock()
        reply = invoke()
        run.latencies_ns[call] = clock() - t0
        return reply

    try:
        pod_id = timed(
            "RunPodSandbox",
            lambda: stub.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=sandbox), timeout=RPC_TIMEOUT),
        ).pod_sandbox_id
        cid = timed(
            "CreateContainer",
            lambda: stub.CreateContainer(
                api_pb2.CreateContainerRequest(
                    pod_sandbox_id=pod_id, config=container_config(image), sandbox_config=sandbox
                ),
                timeout=RPC_TIMEOUT,
            ),
        ).container_id
        timed(
            "StartContainer",
            lambda: stub.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=RPC_TIMEOUT),
        )
        status = timed(
            "ContainerStatus",
            lambda: stub.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=RPC_TIMEOUT),
        )
        if status.status.state != api_pb2.CONTAINER_RUNNING:
            run.anomalies.append(
                f"ContainerStatus: state {api_pb2.ContainerState.Name(status.status.state)} right after start "
                f"(exit {status.status.exit_code}, reason {status.status.reason!r}, {status.status.message!r})"
            )
        result = timed(
            "ExecSync",
            lambda: stub.ExecSync(
                api_pb2.ExecSyncRequest(container_id=cid, cmd=EXEC_COMMAND, timeout=30), timeout=RPC_TIMEOUT
            ),
        )
        if result.exit_code != 0:
            run.anomalies.append(
                f"ExecSync {EXEC_COMMAND}: exit {result.exit_code}, stderr {result.stderr[:200]!r}"
            )
        for _ in range(repeat_execs):
            current = "ExecSync"
            t0 = clock()
            again = stub.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=EXEC_COMMAND, timeout=30), timeout=RPC_TIMEOUT)
            run.repeat_execs_ns.append(clock() - t0)
            if again.exit_code != 0:
                run.anomalies.append(f"ExecSync {EXEC_COMMAND} again: exit {again.exit_code}")
        timed(
            "StopContainer",
            lambda: stub.StopContainer(
                api_pb2.StopContainerRequest(container_id=cid, timeout=STOP_TIMEOUT), timeout=RPC_TIMEOUT
            ),
        )
        timed(
            "RemoveContainer",
            lambda: stub.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=RPC_TIMEOUT),
        )
        timed(
            "StopPodSandbox",
            lambda: stub.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT),
        )
        timed(
            "RemovePodSandbox",
            lambda: stub.RemovePodSandbox(
                api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT
            ),
        )
    except grpc.RpcError as exc:
        run.error = f"{current}: {exc.code().name}: {exc.details()}"
        if pod_id:  # untimed clean-up, so the next pod starts from a clean daemon
            try:
                stub.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT)
            except grpc.RpcError as cleanup:
                run.error += f" (clean-up RemovePodSandbox also failed: {cleanup.code().name}: {cleanup.details()})"
    return run


# -- floor: plain runc ------------------------------------------------------------------------


class RuncFloor:
    """One OCI bundle like pycrio's container, run with plain runc under the bench cgroup parent."""

    def __init__(self, base: Path, cgroup_parent: str, rootfs_source: Path | None) -> None:
        self.base = base
        self.root = base / "runc-root"
        self.bundle = base / "bundle"
        self.errors = base / "runc-stderr.log"
        self.cgroup_parent = cgroup_parent
        self.runc = shutil.which("runc") or "runc"
        self.failures: list[str] = []
        self.root.mkdir(parents=True)
        self.bundle.mkdir(parents=True)
        rootfs = self.bundle / "rootfs"
        if rootfs_source is not None:
            shutil.copytree(rootfs_source, rootfs, symlinks=True)
            self.rootfs_origin = f"copied from the unpacked image layer {rootfs_source.name[:19]}..."
        else:
            (rootfs / "bin").mkdir(parents=True)
            shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
            self.rootfs_origin = "/bin/busybox (no single unpacked layer found)"
        for applet in ("true", "sleep"):
            link = rootfs / "bin" / applet
            if not link.exists() and not link.is_symlink():
                link.symlink_to("busybox")
        subprocess.run([self.runc, "spec", "--bundle", str(self.bundle)], check=True, capture_output=True)
        self.spec = json.loads((self.bundle / "config.json").read_text())
        self.spec["process"]["terminal"] = False

    def _configure(self, args: list[str], name: str) -> str:
        """Write config.json (untimed) with `args` and a cgroup of its own; the container id."""
        self.spec["process"]["args"] = args
        self.spec["linux"]["cgroupsPath"] = f"{self.cgroup_parent}/{name}"
        (self.bundle / "config.json").write_text(json.dumps(self.spec))
        return f"pycrio-bench-{name}"

    def _runc(self, *args: str) -> tuple[int, int]:
        """(wall ns, exit code) of one runc command; stdio never a pipe a container could hold."""
        with self.errors.open("ab") as err:
            t0 = time.perf_counter_ns()
            code = subprocess.run(
                [self.runc, "--root", str(self.root), *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err,
            ).returncode
            return time.perf_counter_ns() - t0, code

    def _failed(self, what: str, code: int) -> None:
        tail = self.errors.read_text(errors="replace").strip().splitlines()[-3:]
        self.failures.append(f"{what}: exit {code}: {' | '.join(tail)}")

    def round(self, i: int) -> dict[str, int]:
        """`runc run` of /bin/true, then create + start + delete -f of sleep 1000 (ns per row)."""
        out: dict[str, int] = {}
        cid = self._configure(["/bin/true"], f"run-{i}")
        ns, code = self._runc("run", "--bundle", str(self.bundle), cid)
        if code == 0:
            out[RUNC_RUN] = ns
        else:
            self._failed(f"runc run {cid}", code)
            self._runc("delete", "--force", cid)
        cid = self._configure(list(CONTAINER_COMMAND), f"split-{i}")
        create, code = self._runc("create", "--bundle", str(self.bundle), cid)
        if code != 0:
            self._failed(f"runc create {cid}", code)
            self._runc("delete", "--force", cid)
            return out
        start, code = self._runc("start", cid)
        if code != 0:
            self._failed(f"runc start {cid}", code)
            self._runc("delete", "--force", cid)
            return out
        delete, code = self._runc("delete", "--force", cid)
        if code != 0:
            self._failed(f"runc delete -f {cid}", code)
            return out
        out.update(
            {
                RUNC_CREATE: create,
                RUNC_START: start,
                RUNC_DELETE: delete,
                RUNC_CREATE_START: create + start,
                RUNC_CREATE_START_DELETE: create + start + delete,
            }
        )
        return out

    def leftovers(self) -> list[str]:
        listed = subprocess.run([self.runc, "--root", str(self.root), "list", "-q"], capture_output=True, text=True)
        return listed.stdout.split()

    def clean(self) -> None:
        for cid in self.leftovers():
            self._runc("delete", "--force", cid)


# -- spans -----------------------------------------------------------------------------------


def children_of(span: ReceivedSpan, spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return sorted((s for s in spans if s.parent_span_id == span.span_id), key=lambda s: s.start_ns)


def span_tree(root: ReceivedSpan, spans: list[ReceivedSpan]) -> list[dict[str, Any]]:
    """Every descendant of `root` depth-first: name, depth, start offset and duration in ms."""
    rows: list[dict[str, Any]] = []

    def walk(span: ReceivedSpan, depth: int) -> None:
        for child in children_of(span, spans):
            rows.append(
                {
                    "name": child.name,
                    "depth": depth,
                    "start_ms": (child.start_ns - root.start_ns) / 1e6,
                    "duration_ms": (child.end_ns - child.start_ns) / 1e6,
                    "status_error": child.status_code == 2,
                }
            )
            walk(child, depth + 1)

    walk(root, 0)
    return rows


def step_totals(root: ReceivedSpan, spans: list[ReceivedSpan]) -> dict[str, float]:
    """ms per step path ("runtime_stop/runtime_kill") under one call span, summed over repeats,
    plus "(no child span)": time of the call span not covered by any direct child."""
    totals: dict[str, float] = {}

    def walk(span: ReceivedSpan, prefix: str) -> None:
        for child in children_of(span, spans):
            path = f"{prefix}{child.name}"
            totals[path] = totals.get(path, 0.0) + (child.end_ns - child.start_ns) / 1e6
            walk(child, f"{path}/")

    walk(root, "")
    direct = [(c.start_ns, c.end_ns) for c in children_of(root, spans)]
    totals["(no child span)"] = (root.end_ns - root.start_ns - union_ns(direct)) / 1e6
    return totals


def analyse_spans(
    spans: list[ReceivedSpan], pid: int, timed_since_ns: int, expected_per_call: int
) -> dict[str, Any]:
    """Counts per call, server-side durations, step breakdowns, from the tracing daemon's spans."""
    mine = [s for s in spans if s.resource.get("process.pid") == pid]
    by_call: dict[str, list[ReceivedSpan]] = {c: [] for c in CALLS}
    for s in mine:
        if s.name.startswith(RUNTIME_SERVICE) and s.parent_span_id == "":
            method = s.name.removeprefix(RUNTIME_SERVICE)
            if method in by_call:
                by_call[method].append(s)
    counts = {c: len(v) for c, v in by_call.items()}
    timed = {c: [s for s in v if s.start_ns >= timed_since_ns] for c, v in by_call.items()}
    errors = [
        f"{s.name}: {s.status_message}" for v in by_call.values() for s in v if s.status_code == 2
    ]

    server = {c: stats_ms([s.end_ns - s.start_ns for s in v]) for c, v in timed.items()}
    steps: dict[str, dict[str, dict[str, float]]] = {}
    for call, call_spans in timed.items():
        per_path: dict[str, list[float]] = {}
        for s in call_spans:
            for path, ms in step_totals(s, mine).items():
                per_path.setdefault(path, []).append(ms)
        span_p50 = server[call]["p50_ms"]
        steps[call] = {
            path: {
                "calls_with_step": len(v),
                "p50_ms": percentile(v, 50),
                "p99_ms": percentile(v, 99),
                "share_of_span_p50": ratio(percentile(v, 50), span_p50),
            }
            for path, v in per_path.items()
        }

    examples: dict[str, Any] = {}
    for call in BREAKDOWN_CALLS:
        candidates = sorted(timed[call], key=lambda s: s.end_ns - s.start_ns)
        if not candidates:
            continue
        median = candidates[(len(candidates) - 1) // 2]
        examples[call] = {
            "trace_id": median.trace_id,
            "span_ms": (median.end_ns - median.start_ns) / 1e6,
            "steps": span_tree(median, mine),
            "no_child_span_ms": step_totals(median, mine)["(no child span)"],
        }
    return {
        "total_received": len(spans),
        "from_tracing_daemon": len(mine),
        "server_spans": counts,
        "expected_server_spans": {c: expected_per_call for c in CALLS},
        "error_spans": errors,
        "child_span_names": sorted({s.name for s in mine if s.parent_span_id}),
        "server_ms": server,
        "steps": steps,
        "examples": examples,
    }


def bridge_in_use() -> list[str]:
    """Interfaces on the bench bridge now: another run of a bench on it (its clean-up would
    delete the bridge under it)."""
    out = subprocess.run(["ip", "-o", "link", "show", "master", BRIDGE], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip() for line in out.splitlines() if ":" in line]


# -- leaks and clean-up ----------------------------------------------------------------------


def leaks(base: Path, daemons: dict[str, PycrioDaemon], floor: RuncFloor | None, pod_parents: list[str]) -> list[str]:
    """Everything of the bench still on the host after every pod's RemovePodSandbox."""
    found: list[str] = []
    for config, daemon in daemons.items():
        if not daemon.alive():
            found.append(f"{config}: daemon not running")
            continue
        with daemon.channel() as ch:
            rt = daemon.runtime(ch)
            pods = rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=RPC_TIMEOUT).items
            ctrs = rt.ListContainers(api_pb2.ListContainersRequest(), timeout=RPC_TIMEOUT).containers
        if pods:
            found.append(f"{config}: {len(pods)} pod sandboxes still listed")
        if ctrs:
            found.append(f"{config}: {len(ctrs)} containers still listed")
        runc_root = daemon.base / "run" / "runtimes" / "runc"
        if runc_root.exists():
            listed = subprocess.run(["runc", "--root", str(runc_root), "list", "-q"], capture_output=True, text=True)
            if listed.stdout.split():
                found.append(f"{config}: runc still has containers {listed.stdout.split()}")
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(base) in line]
    if mounts:
        found.append(f"{len(mounts)} mounts under {base}: {mounts[:5]}")
    conmons = subprocess.run(["pgrep", "-af", "conmon"], capture_output=True, text=True).stdout.splitlines()
    conmons = [line for line in conmons if str(base) in line]
    if conmons:
        found.append(f"{len(conmons)} conmon processes: {[c.split()[0] for c in conmons]}")
    if floor is not None and floor.leftovers():
        found.append(f"runc floor containers left: {floor.leftovers()}")
    for parent in pod_parents:
        left = [p.name for p in (CGROUP_FS / "memory" / parent.strip("/")).glob("*") if p.is_dir()]
        if left:
            found.append(f"{len(left)} cgroups left under memory{parent}: {left[:3]}")
    veths = subprocess.run(["ip", "-o", "link", "show", "master", BRIDGE], capture_output=True, text=True).stdout
    if veths.strip():
        found.append(f"interfaces still on {BRIDGE}: {[line.split(':')[1].strip() for line in veths.splitlines()]}")
    prefix = SUBNET.split("/")[0].rsplit(".", 1)[0] + "."
    rules = [r for r in subprocess.run(["iptables-save"], capture_output=True, text=True).stdout.splitlines() if prefix in r]
    if rules:
        found.append(f"{len(rules)} iptables rules for {SUBNET}: {rules[:3]}")
    if HOST_LOCAL_DIR.exists():
        reserved = [p.name for p in HOST_LOCAL_DIR.iterdir() if p.name.startswith(prefix)]
        if reserved:
            found.append(f"host-local IPs still reserved in {HOST_LOCAL_DIR}: {reserved}")
    deadline = time.monotonic() + 5.0  # a monitor flushes and exits just after answering Shutdown
    while (monitors := monitor_processes(base)[1]) and time.monotonic() < deadline:
        time.sleep(0.1)
    if monitors:
        found.append(f"{len(monitors)} pycrio-monitor processes left: {monitors[:5]}")
    return found


def monitor_processes(base: Path) -> tuple[list[int], list[int]]:
    """(zygotes, monitors) of the bench's daemons: processes with `base` in their command line that
    run pycrio-monitor (exec'd) or the zygote's module (the zygote names itself pycrio-zygote, the
    monitors it forks pycrio-monitor)."""
    mine = os.fsencode(base)
    zygotes: list[int] = []
    monitors: list[int] = []
    for pid in all_pids():
        args = argv(pid)
        if not any(mine in a for a in args):
            continue
        if b"pycrio.monitor.zygote" in b" ".join(args[:3]):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            (monitors if comm == "pycrio-monitor" else zygotes).append(pid)
        elif any(os.path.basename(a) == b"pycrio-monitor" for a in args[:2]):
            monitors.append(pid)
    return zygotes, monitors


def stop_process(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, one process the bench's daemons left (by its pid)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return
            if state == "Z":
                return
            time.sleep(0.05)


def remove_all_pods(daemon: PycrioDaemon) -> int:
    """rmp -f every pod the daemon still lists; how many there were."""
    if not daemon.alive():
        return 0
    try:
        listed = json.loads(daemon.crictl("pods", "-o", "json", check=False).stdout or "{}")
    except json.JSONDecodeError:
        listed = {}
    ids = [item["id"] for item in listed.get("items", [])]
    for pod_id in ids:
        daemon.crictl("rmp", "-f", pod_id, check=False)
    return len(ids)


def clean_up(
    base: Path, daemons: dict[str, PycrioDaemon], floor: RuncFloor | None, cgroup_parent: str
) -> dict[str, Any]:
    """Remove everything the bench made on the host; what had to be forced is reported."""
    report: dict[str, Any] = {"pods_removed_at_clean_up": {}, "problems": []}
    for config, daemon in daemons.items():
        try:
            report["pods_removed_at_clean_up"][config] = remove_all_pods(daemon)
        except Exception as exc:  # noqa: BLE001 - keep cleaning
            report["problems"].append(f"{config}: removing pods: {exc}")
    report["exit_codes"] = {config: daemon.stop() for config, daemon in daemons.items()}
    zygotes, monitors = monitor_processes(base)  # the daemon stops its zygote; monitors went with their pods
    for pid in zygotes + monitors:
        report["problems"].append(f"stopped leftover {'zygote' if pid in zygotes else 'pycrio-monitor'} {pid}")
        stop_process(pid)
    if floor is not None:
        floor.clean()
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        if str(base) in line:
            target = line.split()[4]
            subprocess.run(["umount", "-l", target], capture_output=True)
            report["problems"].append(f"unmounted leftover {target}")
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
    if HOST_LOCAL_DIR.exists():
        shutil.rmtree(HOST_LOCAL_DIR, ignore_errors=True)
    try:
        cgroups.remove_cgroup(cgroup_parent)
    except OSError as exc:
        report["problems"].append(f"cgroup parent {cgroup_parent}: {exc}")
    return report


# -- run -------------------------------------------------------------------------------------


@dataclass
class Results:
    pods: dict[str, list[PodRun]] = field(default_factory=lambda: {c: [] for c in CONFIGS})
    floor: dict[str, list[int]] = field(default_factory=lambda: {r: [] for r in FLOOR_ROWS})
    timed_since_ns: int = 0


def run(
    daemons: dict[str, PycrioDaemon], floor: RuncFloor, image: str, pods: int, logs: Path
) -> Results:
    results = Results()
    configs = [c for c in (*CONFIGS, POD) if c in daemons]
    for config in configs:
        results.pods.setdefault(config, [])
    channels = {c: d.channel() for c, d in daemons.items()}
    stubs = {c: daemons[c].runtime(ch) for c, ch in channels.items()}
    tags = {OFF: "off", ON: "on", POD: "pod"}
    try:
        for w in range(WARMUP_PODS):  # untimed: bridge creation, first CNI and runc runs, caches (the zygote)
            for config in configs:
                warm = lifecycle(stubs[config], image, f"warmup-{w}", secrets.token_hex(8), logs / f"warm-{config}-{w}")
                if warm.error:
                    print(f"  warm-up pod on {config} failed: {warm.error}", file=sys.stderr, flush=True)
            floor.round(-1 - w)
        results.timed_since_ns = time.time_ns()
        t0 = time.monotonic()
        for i in range(pods):
            steps: list[str] = [*configs, FLOOR] if i % 2 == 0 else [FLOOR, *reversed(configs)]
            gc.collect()
            for step in steps:
                if step == FLOOR:
                    for row, ns in floor.round(i).items():
                        results.floor[row].append(ns)
                    continue
                tag = tags[step]
                # the handler comparison also times later execs ("tracing on" keeps one per pod: span counts)
                repeats = REPEAT_EXECS if step in (OFF, POD) and POD in configs else 0
                pod = lifecycle(stubs[step], image, f"bench-{i}", secrets.token_hex(8), logs / f"{tag}-{i}", repeats)
                results.pods[step].append(pod)
                if pod.error:
                    print(f"  pod {i} on {step}: {pod.error}", file=sys.stderr, flush=True)
            if (i + 1) % 10 == 0 or i + 1 == pods:
                print(f"  {i + 1}/{pods} pods per daemon ({time.monotonic() - t0:.1f}s)", file=sys.stderr, flush=True)
    finally:
        for ch in channels.values():
            ch.close()
    return results


def summarize(results: Results) -> dict[str, Any]:
    calls: dict[str, dict[str, Any]] = {}
    for call in CALLS:
        row = {c: stats_ms([p.latencies_ns[call] for p in results.pods[c] if call in p.latencies_ns]) for c in CONFIGS}
        row["p50_ratio"] = ratio(row[ON]["p50_ms"], row[OFF]["p50_ms"])
        row["p99_ratio"] = ratio(row[ON]["p99_ms"], row[OFF]["p99_ms"])
        calls[call] = row
    totals: dict[str, dict[str, Any]] = {}
    for name, members in TOTALS.items():
        row = {
            c: stats_ms(
                [sum(p.latencies_ns[m] for m in members) for p in results.pods[c] if all(m in p.latencies_ns for m in members)]
            )
            for c in CONFIGS
        }
        row["p50_ratio"] = ratio(row[ON]["p50_ms"], row[OFF]["p50_ms"])
        row["p99_ratio"] = ratio(row[ON]["p99_ms"], row[OFF]["p99_ms"])
        totals[name] = row
    floor = {row: stats_ms(v) for row, v in results.floor.items()}
    start = totals[POD_START_TOTAL]
    vs_floor = {
        f"{c} / {base}": {
            "p50": ratio(start[c]["p50_ms"], floor[base]["p50_ms"]),
            "p99": ratio(start[c]["p99_ms"], floor[base]["p99_ms"]),
        }
        for c in CONFIGS
        for base in (RUNC_CREATE_START, RUNC_RUN)
    }
    return {"calls": calls, "totals": totals, "floor": floor, "pod_start_vs_floor": vs_floor}


def summarize_handlers(results: Results) -> dict[str, Any]:
    """The "pod" handler's daemon against the "oci" one (tracing off): p50/p99 per call and total."""

    def row(values: dict[str, list[int]]) -> dict[str, Any]:
        out: dict[str, Any] = {OCI_LABEL: stats_ms(values[OFF]), POD_LABEL: stats_ms(values[POD])}
        out["p50_ratio"] = ratio(out[POD_LABEL]["p50_ms"], out[OCI_LABEL]["p50_ms"])
        out["p99_ratio"] = ratio(out[POD_LABEL]["p99_ms"], out[OCI_LABEL]["p99_ms"])
        return out

    rows: dict[str, Any] = {}
    for call in HANDLER_CALLS:
        rows[call] = row({c: [p.latencies_ns[call] for p in results.pods[c] if call in p.latencies_ns] for c in (OFF, POD)})
        if call == "ExecSync":
            rows[REPEAT_EXEC_ROW] = row({c: [ns for p in results.pods[c] for ns in p.repeat_execs_ns] for c in (OFF, POD)})
    for name, members in HANDLER_TOTALS.items():
        rows[name] = row({
            c: [sum(p.latencies_ns[m] for m in members) for p in results.pods[c] if all(m in p.latencies_ns for m in members)]
            for c in (OFF, POD)
        })  # fmt: skip
    return rows


def handler_checks(rows: dict[str, Any], failures: int, anomalies: int) -> list[dict[str, Any]]:
    out = []
    for call in (*HANDLER_TARGET_CALLS, REPEAT_EXEC_ROW):
        pod, oci = rows[call][POD_LABEL]["p50_ms"], rows[call][OCI_LABEL]["p50_ms"]
        out.append({"check": f'{POD_LABEL} {call} p50 <= {OCI_LABEL} ({oci:.1f} ms)', "value": pod, "limit": oci,
                    "pass": pod <= oci, "unit": " ms"})  # fmt: skip
    out.append({"check": f"failed CRI calls on {POD_LABEL}", "value": failures, "limit": 0, "pass": failures == 0, "unit": ""})
    out.append({"check": f"unexpected answers on {POD_LABEL} (status/exec)", "value": anomalies, "limit": 0,
                "pass": anomalies == 0, "unit": ""})  # fmt: skip
    return out


def print_handlers(rows: dict[str, Any]) -> None:
    print(
        f'\n== {POD_LABEL} handler (one pycrio-monitor per pod) vs {OCI_LABEL} (conmon per container), '
        f'tracing off, same pods =='
    )
    header = (
        f"{'call (ms)':<31} {'oci p50':>8} {'oci p99':>8} {'pod p50':>8} {'pod p99':>8} "
        f"{'pod/oci50':>9} {'pod/oci99':>9}"
    )
    print(f"{header}\n{'-' * len(header)}")
    for name, row in rows.items():
        if name == POD_START_TOTAL:
            print("-" * len(header))
        print(
            f"{name:<31} {fmt(row[OCI_LABEL]['p50_ms'])} {fmt(row[OCI_LABEL]['p99_ms'])} {fmt(row[POD_LABEL]['p50_ms'])} "
            f"{fmt(row[POD_LABEL]['p99_ms'])} {fmt(row['p50_ratio'], 9, 2)} {fmt(row['p99_ratio'], 9, 2)}"
        )
    print(f'({OCI_LABEL} is the "{OFF}" daemon; {POD_LABEL} runs the monitor per pod: RunPodSandbox starts it, '
          "RemovePodSandbox stops it)")


def checks(summary: dict[str, Any], spans: dict[str, Any], failures: int, anomalies: int, leaked: list[str]) -> list[dict[str, Any]]:
    start_ratio = summary["totals"][POD_START_TOTAL]["p50_ratio"]
    life_ratio = summary["totals"][LIFECYCLE_TOTAL]["p50_ratio"]
    worst_call, worst = max(
        ((c, r["p50_ratio"]) for c, r in summary["calls"].items() if not math.isnan(r["p50_ratio"])),
        key=lambda x: x[1],
        default=("-", math.nan),
    )
    missing = sum(
        max(0, spans["expected_server_spans"][c] - spans["server_spans"].get(c, 0)) for c in CALLS
    )
    return [
        {"check": "pod start p50 on/off", "value": start_ratio, "limit": TRACING_RATIO_LIMIT,
         "pass": start_ratio <= TRACING_RATIO_LIMIT, "unit": "x"},
        {"check": "whole lifecycle p50 on/off", "value": life_ratio, "limit": TRACING_RATIO_LIMIT,
         "pass": life_ratio <= TRACING_RATIO_LIMIT, "unit": "x"},
        {"check": f"worst single call p50 on/off ({worst_call})", "value": worst, "limit": TRACING_RATIO_LIMIT,
         "pass": worst <= TRACING_RATIO_LIMIT, "unit": "x"},
        {"check": "failed CRI calls", "value": failures, "limit": 0, "pass": failures == 0, "unit": ""},
        {"check": "unexpected answers (status/exec)", "value": anomalies, "limit": 0, "pass": anomalies == 0, "unit": ""},
        {"check": "server spans missing", "value": missing, "limit": 0, "pass": missing == 0, "unit": ""},
        {"check": "leaks after the last RemovePodSandbox", "value": len(leaked), "limit": 0,
         "pass": not leaked, "unit": ""},
    ]


# -- printing --------------------------------------------------------------------------------


def fmt(v: float, width: int = 8, digits: int = 1) -> str:
    return f"{'-':>{width}}" if math.isnan(v) else f"{v:>{width}.{digits}f}"


def print_table(summary: dict[str, Any], spans: dict[str, Any]) -> None:
    header = (
        f"{'call (ms)':<31} {'off p50':>8} {'off p99':>8} {'on p50':>8} {'on p99':>8} "
        f"{'on/off50':>8} {'on/off99':>8} {'span p50':>8}"
    )
    print(f"\n{header}\n{'-' * len(header)}")
    for call, row in summary["calls"].items():
        print(
            f"{call:<31} {fmt(row[OFF]['p50_ms'])} {fmt(row[OFF]['p99_ms'])} {fmt(row[ON]['p50_ms'])} "
            f"{fmt(row[ON]['p99_ms'])} {fmt(row['p50_ratio'], 8, 2)} {fmt(row['p99_ratio'], 8, 2)} "
            f"{fmt(spans['server_ms'][call]['p50_ms'])}"
        )
    print("-" * len(header))
    for name, row in summary["totals"].items():
        print(
            f"{name:<31} {fmt(row[OFF]['p50_ms'])} {fmt(row[OFF]['p99_ms'])} {fmt(row[ON]['p50_ms'])} "
            f"{fmt(row[ON]['p99_ms'])} {fmt(row['p50_ratio'], 8, 2)} {fmt(row['p99_ratio'], 8, 2)}"
        )
    print("(span p50: duration of the server span on the tracing daemon; the rest is gRPC + client)")

    floor = summary["floor"]
    header = f"{'runc floor (ms)':<31} {'n':>4} {'p50':>8} {'p99':>8} {'min':>8} {'max':>8}"
    print(f"\n{header}\n{'-' * len(header)}")
    for row, s in floor.items():
        print(f"{row:<31} {s['n']:>4d} {fmt(s['p50_ms'])} {fmt(s['p99_ms'])} {fmt(s['min_ms'])} {fmt(s['max_ms'])}")
    start = summary["totals"][POD_START_TOTAL]
    print("\npod start (RunPodSandbox + CreateContainer + StartContainer) against the floor:")
    for config in CONFIGS:
        for base in (RUNC_CREATE_START, RUNC_RUN):
            r = summary["pod_start_vs_floor"][f"{config} / {base}"]
            print(
                f"  {config:<12} p50 {fmt(start[config]['p50_ms'], 6)} ms = {fmt(r['p50'], 5, 1)}x {base:<28} "
                f"(p99 {fmt(start[config]['p99_ms'], 6)} ms = {fmt(r['p99'], 5, 1)}x)"
            )


def print_spans(spans: dict[str, Any], pods: int) -> None:
    print(
        f"\nspans received: {spans['total_received']} in total, {spans['from_tracing_daemon']} from the tracing daemon "
        f"(includes warm-up pods, the image pull and the readiness probe)"
    )
    counts = spans["server_spans"]
    expected = spans["expected_server_spans"]
    print("  server spans per call: " + ", ".join(f"{c} {counts[c]}/{expected[c]}" for c in CALLS))
    print(f"  child span names: {', '.join(spans['child_span_names']) or '(none)'}")
    if spans["error_spans"]:
        print(f"  spans with ERROR status: {len(spans['error_spans'])}, first: {spans['error_spans'][0]}")

    for call, example in spans["examples"].items():
        span_ms = example["span_ms"]
        print(
            f"\n== where one {call} goes (median of {spans['server_ms'][call]['n']} timed calls on the tracing "
            f"daemon): span {span_ms:.1f} ms, trace {example['trace_id']} =="
        )
        header = f"{'step':<34} {'start ms':>9} {'dur ms':>8} {'share':>7}"
        print(f"{header}\n{'-' * len(header)}")
        for step in example["steps"]:
            name = "  " * step["depth"] + step["name"] + (" (ERROR)" if step["status_error"] else "")
            print(f"{name:<34} {step['start_ms']:>9.2f} {step['duration_ms']:>8.2f} {step['duration_ms'] / span_ms:>7.1%}")
        print(f"{'(no child span)':<34} {'':>9} {example['no_child_span_ms']:>8.2f} {example['no_child_span_ms'] / span_ms:>7.1%}")

    print(f"\n== p50 of every step over the {pods} timed calls of each method (tracing daemon) ==")
    header = f"{'call / step':<44} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'of span p50':>11}"
    print(f"{header}\n{'-' * len(header)}")
    for call in CALLS:
        server = spans["server_ms"][call]
        print(f"{call:<44} {server['n']:>4d} {fmt(server['p50_ms'])} {fmt(server['p99_ms'])}")
        steps = spans["steps"].get(call, {})
        for path, s in sorted(steps.items(), key=lambda kv: (kv[0] == "(no child span)", kv[0])):
            print(
                f"  {path:<42} {s['calls_with_step']:>4d} {fmt(s['p50_ms'])} {fmt(s['p99_ms'])} "
                f"{fmt(s['share_of_span_p50'] * 100, 10, 1)}%"
            )


def print_checks(results: list[dict[str, Any]], title: str = "targets") -> None:
    print(f"\n{title}:")
    for check in results:
        value = check["value"]
        shown = f"{value:.3f}{check['unit']}" if isinstance(value, float) else f"{value}"
        limit = f"{check['limit']:.2f}{check['unit']}" if isinstance(check["limit"], float) else f"{check['limit']}"
        verdict = "PASS" if check["pass"] else "MISS"
        print(f"  {check['check']:<48} = {shown:>8}  (<= {limit})  {verdict}")


# -- main ------------------------------------------------------------------------------------


def single_layer(daemon: PycrioDaemon) -> Path | None:
    """The busybox image's one unpacked layer in the daemon's store, if that is what is there."""
    layers_dir = daemon.base / "root" / "storage" / "layers"
    layers = [p for p in layers_dir.iterdir() if p.is_dir()] if layers_dir.exists() else []
    if len(layers) == 1 and (layers[0] / "bin" / "busybox").exists():
        return layers[0]
    return None


def main(argv: list[str] | None = None) -> int:
    """Registry, two (three) daemons, floor bundle; interleaved pods; print; exit 0 whatever the numbers."""
    args = parse_args(argv)
    bench_id = secrets.token_hex(4)
    cgroup_parent = f"/pycrio-bench-mon-{bench_id}"
    pod_parents = {OFF: f"{cgroup_parent}/off", ON: f"{cgroup_parent}/on"}
    if args.with_pod:
        pod_parents[POD] = f"{cgroup_parent}/pod"
    print(
        f"pycrio lifecycle benchmark: {args.pods} pods per daemon (+{WARMUP_PODS} warm-up), tracing off vs on "
        f"(rate 1000000, live receiver, OTEL_BSP_SCHEDULE_DELAY={DAEMON_ENV['OTEL_BSP_SCHEDULE_DELAY']}), "
        f"floor: plain runc, {args.pods} rounds"
        + ('; and a daemon whose default handler is of runtime_type "pod" (tracing off)' if args.with_pod else "")
    )
    print(
        f"container {CONTAINER_COMMAND}, ExecSync {EXEC_COMMAND}, StopContainer timeout {STOP_TIMEOUT} "
        f"(sleep is PID 1 and ignores SIGTERM), cgroup parent {cgroup_parent}, bridge {BRIDGE} {SUBNET}"
    )
    runc_version = subprocess.run(["runc", "--version"], capture_output=True, text=True).stdout.splitlines()
    conmon_version = subprocess.run(["conmon", "--version"], capture_output=True, text=True).stdout.splitlines()
    print(f"python {platform.python_version()}, grpc {grpc.__version__}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"{runc_version[0] if runc_version else 'runc ?'}, {conmon_version[0] if conmon_version else 'conmon ?'}, "
          f"cgroups {cgroups.detect_support().mode}")

    busy = bridge_in_use()
    if busy:
        print(f"bridge {BRIDGE} has interfaces {busy[:3]}: another benchmark run uses it; not starting", file=sys.stderr)
        return 1
    started = time.monotonic()
    report: dict[str, Any] = {
        "parameters": {
            "pods": args.pods,
            "warmup_pods": WARMUP_PODS,
            "container_command": CONTAINER_COMMAND,
            "exec_command": EXEC_COMMAND,
            "stop_timeout": STOP_TIMEOUT,
            "daemon_env": DAEMON_ENV,
            "cgroup_parent": cgroup_parent,
            "bridge": BRIDGE,
            "subnet": SUBNET,
            "handlers": ["oci", "pod"] if args.with_pod else ["oci"],
        }
    }
    receiver = OTLPReceiver().start()
    daemons: dict[str, PycrioDaemon] = {}
    floor: RuncFloor | None = None
    leaked: list[str] = []
    cleanup: dict[str, Any] = {}
    results: Results | None = None
    tracing_pid = 0
    with tempfile.TemporaryDirectory(prefix="pycrio-bench-lifecycle-", ignore_cleanup_errors=True) as tmp:
        base = Path(tmp)
        registry = TestRegistry(base / "registry").start()
        try:
            t0 = time.monotonic()
            image = ImageBuilder(base / "images", registry).busybox("bench/busybox", "1")
            netdir = conflist(base / "net.d")
            daemon_args = {OFF: ["--log-level", "info"], ON: tracing_args(receiver.endpoint, rate=1_000_000)}
            for i, config in enumerate(CONFIGS):
                text = (
                    f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
                    f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
                    f'[pycrio.runtime]\npod_cgroup_parent = "{pod_parents[config]}"\n'
                )
                daemon = PycrioDaemon(base / f"d{i}-{'off' if config == OFF else 'on'}", args=daemon_args[config],
                                      config_text=text, env=DAEMON_ENV)
                daemons[config] = daemon
                daemon.start()
            assert daemons[ON].proc is not None
            tracing_pid = daemons[ON].proc.pid
            if args.with_pod:
                text = (
                    f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
                    f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
                    f'[pycrio.runtime]\ndefault_runtime = "runc"\npod_cgroup_parent = "{pod_parents[POD]}"\n'
                    f'[pycrio.runtime.runtimes.runc]\nruntime_type = "pod"\nruntime_path = "runc"\n'
                )
                daemon = PycrioDaemon(base / "d2-pod", args=daemon_args[OFF], config_text=text, env=DAEMON_ENV)
                daemons[POD] = daemon
                daemon.start()
            for daemon in daemons.values():
                with daemon.channel() as ch:
                    daemon.images(ch).PullImage(
                        api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image.reference)), timeout=300
                    )
            floor = RuncFloor(base / "floor", f"{cgroup_parent}/floor", single_layer(daemons[OFF]))
            print(
                f"image {image.reference} built, pushed and pulled into the {len(daemons)} daemons in "
                f"{time.monotonic() - t0:.1f}s (untimed); floor rootfs {floor.rootfs_origin}"
            )
            results = run(daemons, floor, image.reference, args.pods, base / "logs")
            leaked = leaks(base, daemons, floor, [*pod_parents.values(), f"{cgroup_parent}/floor"])
        except Exception as exc:  # noqa: BLE001 - report, clean up, exit 0
            print(f"\nbenchmark aborted: {type(exc).__name__}: {exc}", flush=True)
            report["aborted"] = f"{type(exc).__name__}: {exc}"
        finally:
            cleanup = clean_up(base, daemons, floor, cgroup_parent)
            registry.stop()
    # The tracing daemon flushed its queue on SIGTERM; give the last batch a moment to land.
    spans_all = receiver.settle(quiet=1.0, timeout=10.0)
    receiver.stop()
    duration = time.monotonic() - started

    if results is None:
        print(f"no results; clean-up: {cleanup}")
        report["cleanup"] = cleanup
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
        return 0

    summary = summarize(results)
    timed_pods = len(results.pods[ON])
    spans = analyse_spans(spans_all, tracing_pid, results.timed_since_ns, timed_pods + WARMUP_PODS)
    failures = [(c, i, p.error) for c in CONFIGS for i, p in enumerate(results.pods[c]) if p.error]
    anomalies = [(c, i, a) for c in CONFIGS for i, p in enumerate(results.pods[c]) for a in p.anomalies]
    target_checks = checks(summary, spans, len(failures) + len(floor.failures if floor else []), len(anomalies), leaked)
    with_pod = POD in results.pods
    pod_failures = [(POD, i, p.error) for i, p in enumerate(results.pods.get(POD, [])) if p.error]
    pod_anomalies = [(POD, i, a) for i, p in enumerate(results.pods.get(POD, [])) for a in p.anomalies]
    handler_rows = summarize_handlers(results) if with_pod else {}
    pod_checks = handler_checks(handler_rows, len(pod_failures), len(pod_anomalies)) if with_pod else []

    print_table(summary, spans)
    print_spans(spans, timed_pods)
    if with_pod:
        print_handlers(handler_rows)
    print("\nfailures:" if failures or anomalies or pod_failures or pod_anomalies or (floor and floor.failures)
          else "\nfailures: none")  # fmt: skip
    for config, i, error in failures + pod_failures:
        print(f"  {config} pod {i}: {error}")
    for config, i, anomaly in anomalies + pod_anomalies:
        print(f"  {config} pod {i}: {anomaly}")
    for failure in floor.failures if floor else []:
        print(f"  floor: {failure}")
    print("leaks after the last RemovePodSandbox: " + ("none" if not leaked else ""))
    for leak in leaked:
        print(f"  {leak}")
    print(
        f"clean-up: pods force-removed {cleanup.get('pods_removed_at_clean_up')}, daemon exit codes "
        f"{cleanup.get('exit_codes')}" + (f", problems: {cleanup['problems']}" if cleanup.get("problems") else "")
    )
    print_checks(target_checks)
    if with_pod:
        print_checks(pod_checks, f'targets, {POD_LABEL} vs {OCI_LABEL}')
    print(f"\ntotal time {duration:.1f}s")

    report.update(
        {
            "summary": summary,
            "spans": spans,
            "handlers": handler_rows,
            "failures": [{"config": c, "pod": i, "error": e} for c, i, e in failures + pod_failures],
            "anomalies": [{"config": c, "pod": i, "anomaly": a} for c, i, a in anomalies + pod_anomalies],
            "floor_failures": floor.failures if floor else [],
            "leaks": leaked,
            "cleanup": cleanup,
            "checks": target_checks,
            "handler_checks": pod_checks,
            "latencies_ms": {
                c: {
                    call: [p.latencies_ns[call] / 1e6 if call in p.latencies_ns else None for p in results.pods[c]]
                    for call in CALLS
                }
                for c in results.pods
            },
            "floor_ms": {row: [v / 1e6 for v in values] for row, values in results.floor.items()},
            "duration_s": duration,
        }
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
