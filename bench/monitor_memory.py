"""Memory of the "pod" runtime: one pycrio-monitor per pod against one conmon per container ("oci").

What is measured, in one run on this host, with one daemon and three handlers on the same runc:
  "pod"       runtime_type "pod" as the tree runs it: runtime_pod.py runs `pycrio-monitor
              --zygote-socket <runroot>/monitor-zygote.sock`, so every pod's monitor is forked from
              one pre-imported zygote (pycrio.monitor.zygote) and shares its pages until written;
  "pod-exec"  the same handler type with `--zygote-socket` taken off the monitor's command line by a
              bench-side shim in the daemon's launcher (no config knob turns the zygote off): one
              exec'd, daemonized Python process per pod, the lever's "before";
  "pod-direct" (with --tracing-rate only) "pod" with `--tracing-relay` taken off the monitor's
              command line by the same shim: each forked monitor exports its spans over an OTLP/gRPC
              channel of its own instead of through the daemon's span relay (pycrio.tracing.relay),
              the relay's "before";
  "oci"       conmon + runc per container.
For each N of --pods (default 1,10,50) and each handler in turn (order alternating per N): N pods
(kubelet-like: network and IPC namespaces per pod, PID namespace per container) on the handler,
each with one running busybox `sleep 1000`; then, from /proc/<pid>/smaps_rollup, RSS, PSS and USS
(Private_Clean + Private_Dirty) of the processes the handler runs for them:
  "pod", "pod-exec"  the monitors (their pids from <pod dir>/monitor/monitor.pid); for "pod" also
                     the zygote, listed separately and amortised over the pods: per pod =
                     (monitors' PSS + zygote's PSS) / N (PSS already splits shared pages between
                     the processes mapping them, so the sum is the group's real footprint);
  "oci"              the conmon processes of the containers (cmdline under the bench's runroot).
Two moments: "idle" (SETTLE s after the last StartContainer) and "after exec" (after one ExecSync
`/bin/busybox true` in every container: the exec path writes pages a forked monitor shared). The
daemon's own PSS is shown beside, with its growth over the round (its per-pod cost: a WatchExits
thread and pooled sockets per monitor for "pod", an exit watcher for "oci"). RSS sums count shared
pages once per process; PSS is the number to compare. Then the pods go (StopPodSandbox +
RemovePodSandbox) and the host is checked: no monitor, conmon, runc container or pod directory of
that handler left (the zygote stays: it serves the runroot until the daemon stops).

Target (issue 13): PSS per pod <= 15 MiB at 50 pods, for "pod" as the tree runs it (zygote
amortised); shown for "pod-exec" too.

Own CNI bridge pycriombh0 (10.147.0.0/24), own temp dirs, cgroup parent /pycrio-bench-mon-<id>;
everything is removed at the end (pods, daemon, zygote, bridge, host-local state, cgroups).

Run from the repo root, as root:
  .venv/bin/python bench/monitor_memory.py [--pods 1,10,50] [--no-exec-variant] [--json PATH]
"""

from __future__ import annotations

import argparse
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from pycrio.cri import api_pb2  # noqa: E402
from pycrio.oci import cgroups  # noqa: E402
from pycrio.procfs import all_pids, argv  # noqa: E402
from tests.cni_fixture import bridge_network  # noqa: E402
from tests.harness import PycrioDaemon  # noqa: E402
from tests.otlp_receiver import OTLPReceiver  # noqa: E402
from tests.registry_fixture import ImageBuilder, TestRegistry  # noqa: E402

POD = "pod"
POD_EXEC = "pod-exec"
POD_DIRECT = "pod-direct"
FORKED = (POD, POD_DIRECT)  # monitors forked from the zygote: it is amortised over their pods
OCI = "oci"
RUNC = "/usr/sbin/runc"

BRIDGE = "pycriombh0"
SUBNET = "10.147.0.0/24"
NETWORK_NAME = "pycrio-bench-mon"
HOST_LOCAL_DIR = Path("/var/lib/cni/networks") / NETWORK_NAME

CONTAINER_COMMAND = ["/bin/sleep", "1000"]
EXEC_COMMAND = ["/bin/busybox", "true"]
RPC_TIMEOUT = 60.0
SETTLE = 1.0  # s between the last start and the "idle" sample
TARGET_PSS_MIB = 15.0
TARGET_PODS = 50
IDLE = "idle"
AFTER_EXEC = "after exec"
STATES = (IDLE, AFTER_EXEC)
KIB = 1024
MIB = 1024 * 1024

# Run as the daemon's launcher: PodRuntime has no knob for the zygote nor the span relay, so the
# "pod-exec" handler's monitor command line loses its --zygote-socket and the "pod-direct" one's its
# --tracing-relay (nothing else changes). argv[1]: JSON {handler: option to take off}.
SHIM = """
import json, runpy, sys
taken_off = json.loads(sys.argv.pop(1))
from pycrio.oci import runtime_pod
_monitor_argv = runtime_pod.PodRuntime._monitor_argv
def _without(self, monitor, cgroup):
    command = list(_monitor_argv(self, monitor, cgroup))
    option = taken_off.get(self.name)
    if option in command:
        at = command.index(option)
        del command[at:at + 2]
    return command
runtime_pod.PodRuntime._monitor_argv = _without
runpy.run_module("pycrio", run_name="__main__", alter_sys=True)
"""
SHIM_OPTIONS = {POD_EXEC: "--zygote-socket", POD_DIRECT: "--tracing-relay"}


# -- options ---------------------------------------------------------------------------------


def parse_args(argv_: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", default="1,10,50", help="comma-separated pod counts (default: %(default)s)")
    parser.add_argument("--no-exec-variant", action="store_true", help=f'skip the "{POD_EXEC}" handler')
    parser.add_argument(
        "--tracing-rate", type=int, metavar="PER_MILLION", default=None,
        help="run the daemon (so every monitor) with tracing on at this rate, to a live OTLP receiver "
             "(a tracing monitor loads the OTLP exporter); default: tracing off",
    )  # fmt: skip
    parser.add_argument(
        "--no-direct-variant", action="store_true",
        help=f'with --tracing-rate: skip the "{POD_DIRECT}" handler (monitors exporting over their own channel)',
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv_)
    if args.tracing_rate is not None and not 0 <= args.tracing_rate <= 1_000_000:
        parser.error("--tracing-rate must be within 0..1000000")
    try:
        args.counts = [int(n) for n in args.pods.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--pods: not a comma-separated list of integers: {args.pods!r}")
    if not args.counts or min(args.counts) < 1:
        parser.error("--pods needs counts >= 1")
    args.handlers = [POD, OCI] if args.no_exec_variant else [POD, POD_EXEC, OCI]
    if args.tracing_rate is not None and not args.no_direct_variant:
        args.handlers.insert(1, POD_DIRECT)
    return args


# -- memory ----------------------------------------------------------------------------------


@dataclass
class Mem:
    """One process's smaps_rollup in bytes (0 if it is gone)."""

    rss: int = 0
    pss: int = 0
    uss: int = 0
    swap: int = 0

    def __add__(self, other: Mem) -> Mem:
        return Mem(self.rss + other.rss, self.pss + other.pss, self.uss + other.uss, self.swap + other.swap)


def smaps_rollup(pid: int) -> Mem | None:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            values[parts[0][:-1]] = int(parts[1]) * KIB
    return Mem(
        rss=values.get("Rss", 0),
        pss=values.get("Pss", 0),
        uss=values.get("Private_Clean", 0) + values.get("Private_Dirty", 0),
        swap=values.get("Swap", 0),
    )


def total(pids: list[int]) -> tuple[Mem, int]:
    """Summed memory of `pids` and how many were readable."""
    mem, seen = Mem(), 0
    for pid in pids:
        one = smaps_rollup(pid)
        if one is not None:
            mem, seen = mem + one, seen + 1
    return mem, seen


# -- processes -------------------------------------------------------------------------------


class Processes:
    """The bench daemon's per-pod processes, told apart by its runroot in their command line."""

    def __init__(self, daemon: PycrioDaemon) -> None:
        self.daemon = daemon
        self.run = daemon.base / "run"

    def _mine(self) -> list[tuple[int, list[bytes]]]:
        run = os.fsencode(self.run)
        found = []
        for pid in all_pids():
            args = argv(pid)
            if any(run in a for a in args):
                found.append((pid, args))
        return found

    def monitor_pid(self, pod_id: str) -> int:
        try:
            return int((self.run / "pods" / pod_id / "monitor" / "monitor.pid").read_text().strip())
        except (OSError, ValueError):
            return 0

    def _kinds(self) -> tuple[list[int], list[int]]:
        """(zygotes, monitors). A monitor forked from a zygote keeps the zygote's command line but
        names itself pycrio-monitor (comm), the zygote pycrio-zygote; an exec'd monitor runs the
        pycrio-monitor script."""
        zygotes: list[int] = []
        monitors: list[int] = []
        for pid, args in self._mine():
            head = b" ".join(args[:3])
            if b"pycrio.monitor.zygote" in head:
                (zygotes if _comm(pid) != "pycrio-monitor" else monitors).append(pid)
            elif any(os.path.basename(a) == b"pycrio-monitor" for a in args[:2]):
                monitors.append(pid)
        return zygotes, monitors

    def zygotes(self) -> list[int]:
        return self._kinds()[0]

    def monitors(self) -> list[int]:
        """pycrio-monitor processes (exec'd or forked from a zygote), zygotes excluded."""
        return self._kinds()[1]

    def conmons(self) -> list[int]:
        return [pid for pid, args in self._mine() if args and os.path.basename(args[0]) == b"conmon"]


# -- pods ------------------------------------------------------------------------------------


def pod_config(name: str, log_dir: Path) -> api_pb2.PodSandboxConfig:
    """A pod as kubelet sends it: own network and IPC namespaces, PID namespace per container."""
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="bench-mon", uid=secrets.token_hex(8), attempt=0),
        hostname=name,
        log_directory=str(log_dir),
        linux=api_pb2.LinuxPodSandboxConfig(
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(network=api_pb2.POD, pid=api_pb2.CONTAINER, ipc=api_pb2.POD)
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
                namespace_options=api_pb2.NamespaceOption(network=api_pb2.POD, pid=api_pb2.CONTAINER, ipc=api_pb2.POD)
            )
        ),
    )


@dataclass
class Pod:
    pod_id: str = ""
    container_id: str = ""
    start_ms: float = math.nan  # RunPodSandbox + CreateContainer + StartContainer
    run_ms: float = math.nan  # RunPodSandbox alone (it starts the monitor)
    exec_ms: float = math.nan


class Bench:
    def __init__(self, daemon: PycrioDaemon, image: str, logs: Path) -> None:
        self.daemon = daemon
        self.image = image
        self.logs = logs
        self.channel = daemon.channel()
        self.stub = daemon.runtime(self.channel)
        self.live: dict[str, str] = {}  # pod id -> handler, until removed
        self.errors: list[str] = []

    def start_pod(self, handler: str, name: str) -> Pod:
        pod = Pod()
        sandbox = pod_config(name, self.logs / name)
        try:
            t0 = time.perf_counter()
            pod.pod_id = self.stub.RunPodSandbox(
                api_pb2.RunPodSandboxRequest(config=sandbox, runtime_handler=handler), timeout=RPC_TIMEOUT
            ).pod_sandbox_id
            pod.run_ms = (time.perf_counter() - t0) * 1000
            self.live[pod.pod_id] = handler
            pod.container_id = self.stub.CreateContainer(
                api_pb2.CreateContainerRequest(
                    pod_sandbox_id=pod.pod_id, config=container_config(self.image), sandbox_config=sandbox
                ),
                timeout=RPC_TIMEOUT,
            ).container_id
            self.stub.StartContainer(api_pb2.StartContainerRequest(container_id=pod.container_id), timeout=RPC_TIMEOUT)
            pod.start_ms = (time.perf_counter() - t0) * 1000
        except grpc.RpcError as exc:
            self.errors.append(f"{handler} {name}: start: {exc.code().name}: {exc.details()}")
        return pod

    def exec_in(self, handler: str, pod: Pod) -> None:
        if not pod.container_id:
            return
        try:
            t0 = time.perf_counter()
            reply = self.stub.ExecSync(
                api_pb2.ExecSyncRequest(container_id=pod.container_id, cmd=EXEC_COMMAND, timeout=30), timeout=RPC_TIMEOUT
            )
            pod.exec_ms = (time.perf_counter() - t0) * 1000
            if reply.exit_code != 0:
                self.errors.append(f"{handler} {pod.container_id[:12]}: ExecSync exit {reply.exit_code}: {reply.stderr[:200]!r}")
        except grpc.RpcError as exc:
            self.errors.append(f"{handler} {pod.container_id[:12]}: ExecSync: {exc.code().name}: {exc.details()}")

    def running(self, pods: list[Pod]) -> int:
        listed = self.stub.ListContainers(
            api_pb2.ListContainersRequest(
                filter=api_pb2.ContainerFilter(state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_RUNNING))
            ),
            timeout=RPC_TIMEOUT,
        ).containers
        ids = {c.id for c in listed}
        return sum(1 for p in pods if p.container_id in ids)

    def remove(self, pod_id: str) -> None:
        handler = self.live.get(pod_id, "?")
        try:
            self.stub.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT)
            self.stub.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT)
            self.live.pop(pod_id, None)
        except grpc.RpcError as exc:
            self.errors.append(f"{handler} {pod_id[:12]}: remove: {exc.code().name}: {exc.details()}")

    def close(self) -> None:
        self.channel.close()


# -- one round -------------------------------------------------------------------------------


@dataclass
class Sample:
    """The handler's per-pod processes (and the zygote, the daemon) at one moment."""

    procs: int = 0
    mem: Mem = field(default_factory=Mem)
    zygote_procs: int = 0
    zygote: Mem = field(default_factory=Mem)
    daemon: Mem = field(default_factory=Mem)
    threads: int = 0  # of the handler's processes, summed
    cpu_s: float = 0.0  # utime + stime of the handler's processes since they started, summed


def threads_and_cpu(pids: list[int]) -> tuple[int, float]:
    """Threads and CPU seconds (utime + stime) of `pids`, summed (gone ones count 0)."""
    threads, ticks = 0, 0
    for pid in pids:
        try:
            threads += len(os.listdir(f"/proc/{pid}/task"))
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return threads, ticks / os.sysconf("SC_CLK_TCK")


def sample(handler: str, pods: list[Pod], procs: Processes, daemon_pid: int) -> Sample:
    if handler == OCI:
        pids = procs.conmons()
    else:
        pids = [pid for pid in (procs.monitor_pid(p.pod_id) for p in pods if p.pod_id) if pid]
    mem, seen = total(pids)
    threads, cpu_s = threads_and_cpu(pids)
    out = Sample(procs=seen, mem=mem, daemon=smaps_rollup(daemon_pid) or Mem(), threads=threads, cpu_s=cpu_s)
    if handler in FORKED:
        out.zygote, out.zygote_procs = total(procs.zygotes())
    return out


def per_pod(s: Sample, n: int) -> dict[str, float]:
    """MiB per pod: the handler's processes plus the zygote amortised over the n pods."""
    return {
        "rss": (s.mem.rss + s.zygote.rss) / n / MIB,
        "pss": (s.mem.pss + s.zygote.pss) / n / MIB,
        "uss": (s.mem.uss + s.zygote.uss) / n / MIB,
    }


def round_for(bench: Bench, procs: Processes, handler: str, n: int, tag: str) -> dict[str, Any]:
    """N pods on `handler`, two samples, then the pods removed and the leftovers checked."""
    daemon_pid = bench.daemon.proc.pid if bench.daemon.proc else 0
    before = smaps_rollup(daemon_pid) or Mem()
    t0 = time.monotonic()
    pods = [bench.start_pod(handler, f"mem-{tag}-{handler}-{i}") for i in range(n)]
    started_s = time.monotonic() - t0
    time.sleep(SETTLE)
    running = bench.running(pods)
    samples = {IDLE: sample(handler, pods, procs, daemon_pid)}
    for pod in pods:
        bench.exec_in(handler, pod)
    samples[AFTER_EXEC] = sample(handler, pods, procs, daemon_pid)
    t1 = time.monotonic()
    for pod in pods:
        if pod.pod_id:
            bench.remove(pod.pod_id)
    removed_s = time.monotonic() - t1
    left = leftovers(bench, procs, handler)
    return {
        "handler": handler,
        "pods": n,
        "running": running,
        "daemon_before": before,
        "samples": samples,
        "start_ms": sorted(p.start_ms for p in pods if not math.isnan(p.start_ms)),
        "run_ms": sorted(p.run_ms for p in pods if not math.isnan(p.run_ms)),
        "exec_ms": sorted(p.exec_ms for p in pods if not math.isnan(p.exec_ms)),
        "started_s": started_s,
        "removed_s": removed_s,
        "leftovers": left,
    }


def leftovers(bench: Bench, procs: Processes, handler: str) -> list[str]:
    """What of the handler's pods is still on the host after their RemovePodSandbox."""
    found = []
    deadline = time.monotonic() + 5.0  # a monitor flushes and exits just after answering Shutdown
    while True:
        monitors, conmons = procs.monitors(), procs.conmons()
        if not monitors and not conmons or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if monitors:
        found.append(f"{handler}: {len(monitors)} pycrio-monitor processes left: {monitors[:5]}")
    if conmons:
        found.append(f"{handler}: {len(conmons)} conmon processes left: {conmons[:5]}")
    root = bench.daemon.base / "run" / "runtimes" / handler
    if root.exists():
        listed = subprocess.run([RUNC, "--root", str(root), "list", "-q"], capture_output=True, text=True).stdout.split()
        if listed:
            found.append(f"{handler}: runc still has containers {listed[:5]}")
    pods_dir = bench.daemon.base / "run" / "pods"
    if pods_dir.exists():
        dirs = [p.name for p in pods_dir.iterdir()]
        if dirs:
            found.append(f"{handler}: pod directories left under {pods_dir}: {dirs[:3]}")
    return found


def cgroups_left(parent: str) -> list[str]:
    left: list[str] = []
    for directory in cgroups.controller_dirs(parent).values():
        if directory.is_dir():
            left += [f"{directory.parent.name}/{p.name}" for p in directory.iterdir() if p.is_dir()]
    return left


def bridge_in_use() -> list[str]:
    """Interfaces on the bench bridge now: another run of a bench on it (its clean-up would
    delete the bridge under it)."""
    out = subprocess.run(["ip", "-o", "link", "show", "master", BRIDGE], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip() for line in out.splitlines() if ":" in line]


# -- clean-up --------------------------------------------------------------------------------


def stop_pid(pid: int, timeout: float = 5.0) -> bool:
    """SIGTERM then SIGKILL one process we started (directly or through the daemon)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                return True
            time.sleep(0.05)
    return False


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def clean_up(base: Path, bench: Bench | None, daemon: PycrioDaemon | None, cgroup_parent: str) -> list[str]:
    """Remove everything the bench made; what had to be forced is returned."""
    problems: list[str] = []
    procs = Processes(daemon) if daemon is not None else None
    if bench is not None:
        for pod_id in list(bench.live):
            bench.remove(pod_id)
            problems.append(f"pod {pod_id[:12]} removed at clean-up")
        bench.close()
    if daemon is not None:
        code = daemon.stop()
        if code not in (0, None):
            problems.append(f"daemon exited {code}")
    if procs is not None:
        for pid in procs.zygotes():  # the daemon stops its zygote at shutdown (PodRuntime.close)
            problems.append(f"zygote {pid} still ran after the daemon stopped: stopped it")
            if not stop_pid(pid):
                problems.append(f"zygote {pid} would not exit")
        for pid in procs.monitors() + procs.conmons():
            problems.append(f"killed leftover process {pid} {b' '.join(argv(pid)[:2])!r}")
            stop_pid(pid, 1.0)
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        if str(base) in line:
            target = line.split()[4]
            subprocess.run(["umount", "-l", target], capture_output=True)
            problems.append(f"unmounted leftover {target}")
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
    shutil.rmtree(HOST_LOCAL_DIR, ignore_errors=True)
    left = cgroups_left(cgroup_parent)
    if left:
        problems.append(f"cgroups left under {cgroup_parent}: {left[:5]}")
    try:
        cgroups.remove_cgroup(cgroup_parent)
    except OSError as exc:
        problems.append(f"cgroup parent {cgroup_parent}: {exc}")
    return problems


# -- printing --------------------------------------------------------------------------------


def mib(v: float) -> str:
    return f"{v / MIB:8.1f}"


def p50(values: list[float]) -> float:
    return values[(len(values) - 1) // 2] if values else math.nan


def print_round_table(n: int, rounds: list[dict[str, Any]]) -> None:
    print(f"\n== {n} pod{'s' if n > 1 else ''}, one running `{' '.join(CONTAINER_COMMAND)}` each (MiB) ==")
    header = (
        f"{'handler / processes':<28} {'state':<10} {'procs':>5} {'RSS sum':>8} {'PSS sum':>8} "
        f"{'RSS/pod':>8} {'PSS/pod':>8} {'USS/pod':>8} {'daemon':>8} {'+PSS':>7} {'thr/pod':>7} {'CPU ms/pod':>10}"
    )
    print(f"{header}\n{'-' * len(header)}")
    for r in rounds:
        handler = r["handler"]
        what = {POD: "monitors (forked)", POD_DIRECT: "monitors (own OTLP)", POD_EXEC: "monitors (exec'd)",
                OCI: "conmon"}[handler]
        for state in STATES:
            s: Sample = r["samples"][state]
            pp = per_pod(Sample(mem=s.mem), n)
            grown = (s.daemon.pss - r["daemon_before"].pss) / MIB
            print(
                f"{handler + ': ' + what:<28} {state:<10} {s.procs:>5d} {mib(s.mem.rss)} {mib(s.mem.pss)} "
                f"{pp['rss']:8.2f} {pp['pss']:8.2f} {pp['uss']:8.2f} {mib(s.daemon.pss)} {grown:+7.1f} "
                f"{s.threads / n:7.1f} {s.cpu_s * 1000 / n:10.0f}"
            )
            if handler in FORKED:
                z = per_pod(Sample(mem=s.zygote), n)
                print(
                    f"{'  the zygote':<28} {state:<10} {s.zygote_procs:>5d} {mib(s.zygote.rss)} "
                    f"{mib(s.zygote.pss)} {z['rss']:8.2f} {z['pss']:8.2f} {z['uss']:8.2f}"
                )
                a = per_pod(s, n)
                print(
                    f"{'  monitors + zygote':<28} {state:<10} {s.procs + s.zygote_procs:>5d} "
                    f"{mib(s.mem.rss + s.zygote.rss)} {mib(s.mem.pss + s.zygote.pss)} "
                    f"{a['rss']:8.2f} {a['pss']:8.2f} {a['uss']:8.2f}"
                )
    print(
        "(daemon: the daemon's PSS at that moment; +PSS: its growth since before the round's first pod; "
        "thr/pod, CPU ms/pod: threads and CPU time since start of the handler's processes, per pod)"
    )
    print(
        "pod start p50 (Run+Create+Start) / RunPodSandbox p50 / ExecSync p50 ms: "
        + "; ".join(
            f"{r['handler']} {p50(r['start_ms']):.0f} / {p50(r['run_ms']):.0f} / {p50(r['exec_ms']):.0f}"
            for r in rounds
        )
    )
    print(
        "started in / removed in: "
        + "; ".join(f"{r['handler']} {r['started_s']:.1f}s / {r['removed_s']:.1f}s" for r in rounds)
    )


def summary_rows(results: list[dict[str, Any]], handlers: list[str]) -> dict[int, dict[str, dict[str, float]]]:
    """PSS per pod (MiB, zygote amortised) after exec: N -> handler -> numbers."""
    rows: dict[int, dict[str, dict[str, float]]] = {}
    for r in results:
        s: Sample = r["samples"][AFTER_EXEC]
        idle: Sample = r["samples"][IDLE]
        rows.setdefault(r["pods"], {})[r["handler"]] = {
            "pss_per_pod": per_pod(s, r["pods"])["pss"],
            "rss_per_pod": per_pod(s, r["pods"])["rss"],
            "idle_pss_per_pod": per_pod(idle, r["pods"])["pss"],
            "procs": s.procs,
        }
    return rows


def print_summary(rows: dict[int, dict[str, dict[str, float]]], handlers: list[str]) -> None:
    print("\n== PSS per pod (MiB; zygote amortised; idle -> after one ExecSync each) ==")
    header = f"{'pods':>5} " + " ".join(f"{h:>18}" for h in handlers)
    if OCI in handlers:
        header += " " + " ".join(f"{h + '/oci':>15}" for h in handlers if h != OCI)
    print(f"{header}\n{'-' * len(header)}")
    for n, by in sorted(rows.items()):
        line = f"{n:>5} " + " ".join(
            f"{by[h]['idle_pss_per_pod']:8.2f} -> {by[h]['pss_per_pod']:6.2f}" if h in by else f"{'-':>18}"
            for h in handlers
        )
        if OCI in handlers and OCI in by:
            line += " " + " ".join(
                f"{by[h]['pss_per_pod'] / by[OCI]['pss_per_pod']:14.1f}x" if h in by and by[OCI]["pss_per_pod"] else f"{'-':>15}"
                for h in handlers if h != OCI
            )
        print(line)
    print("RSS per pod after exec (MiB): " + "; ".join(
        f"{n} pods: " + ", ".join(f"{h} {by[h]['rss_per_pod']:.2f}" for h in handlers if h in by)
        for n, by in sorted(rows.items())
    ))


def target_checks(rows: dict[int, dict[str, dict[str, float]]], handlers: list[str], errors: int, leaks: int) -> list[dict[str, Any]]:
    n = TARGET_PODS if TARGET_PODS in rows else max(rows)
    at = f"at {n} pods" + ("" if n == TARGET_PODS else f" (no {TARGET_PODS}-pod round)")
    checks = []
    for handler, label, info in ((POD, '"pod" as the tree runs it (zygote)', False),
                                 (POD_DIRECT, '"pod-direct" (own OTLP channels, for comparison)', True),
                                 (POD_EXEC, '"pod-exec" (no zygote, for comparison)', True)):  # fmt: skip
        if handler in handlers and handler in rows[n]:
            value = rows[n][handler]["pss_per_pod"]
            checks.append({"check": f"PSS per pod <= {TARGET_PSS_MIB:.0f} MiB {at}, {label}", "value": value,
                           "limit": TARGET_PSS_MIB, "pass": value <= TARGET_PSS_MIB, "unit": " MiB", "info": info})
    checks.append({"check": "failed CRI calls", "value": errors, "limit": 0, "pass": errors == 0, "unit": ""})
    checks.append({"check": "leftovers after the pods' removal", "value": leaks, "limit": 0, "pass": leaks == 0, "unit": ""})
    return checks


def print_checks(checks: list[dict[str, Any]]) -> None:
    print("\ntargets:")
    for c in checks:
        value = f"{c['value']:.2f}{c['unit']}" if isinstance(c["value"], float) else str(c["value"])
        limit = f"{c['limit']:.0f}{c['unit']}" if isinstance(c["limit"], float) else str(c["limit"])
        verdict = "PASS" if c["pass"] else "MISS"
        print(f"  {c['check']:<66} = {value:>10}  (<= {limit})  {f'({verdict}, not a target)' if c.get('info') else verdict}")


# -- main ------------------------------------------------------------------------------------


class ShimDaemon(PycrioDaemon):
    """A PycrioDaemon started through SHIM (handlers' monitors lose an option, SHIM_OPTIONS)."""

    def __init__(self, *args: Any, shimmed: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.taken_off = {h: SHIM_OPTIONS[h] for h in shimmed if h in SHIM_OPTIONS}

    def command(self, *extra: str) -> list[str]:
        command = super().command(*extra)
        if not self.taken_off:
            return command
        assert command[1:3] == ["-m", "pycrio"], command
        return [command[0], "-c", SHIM, json.dumps(self.taken_off), *command[3:]]


def daemon_config(
    registry: TestRegistry, netdir: Path, cgroup_parent: str, handlers: list[str], tracing: tuple[str, int] | None = None
) -> str:
    text = (
        f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
        f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
        f'[pycrio.runtime]\ndefault_runtime = "{OCI}"\npod_cgroup_parent = "{cgroup_parent}"\n'
    )
    if tracing is not None:
        endpoint, rate = tracing
        text += (
            f'[pycrio.tracing]\nenable_tracing = true\ntracing_endpoint = "{endpoint}"\n'
            f"tracing_sampling_rate_per_million = {rate}\n"
        )
    for handler in handlers:
        kind = "oci" if handler == OCI else "pod"
        text += f'[pycrio.runtime.runtimes.{handler}]\nruntime_type = "{kind}"\nruntime_path = "{RUNC}"\n'
    return text


def to_json(value: Any) -> Any:
    if isinstance(value, (Mem, Sample)):
        return {k: to_json(v) for k, v in value.__dict__.items()}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def main(argv_: list[str] | None = None) -> int:
    """Registry, one daemon with the handlers; rounds per N; print; exit 0 whatever the numbers."""
    args = parse_args(argv_)
    handlers: list[str] = args.handlers
    bench_id = secrets.token_hex(4)
    cgroup_parent = f"/pycrio-bench-mon-{bench_id}"
    conmon_version = subprocess.run(["conmon", "--version"], capture_output=True, text=True).stdout.splitlines()
    print(
        f"pycrio monitor memory benchmark: pods {args.counts} per handler {handlers}, container "
        f"{CONTAINER_COMMAND}, ExecSync {EXEC_COMMAND}; cgroup parent {cgroup_parent}, bridge {BRIDGE} {SUBNET}"
    )
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"{conmon_version[0] if conmon_version else 'conmon ?'}, cgroups {cgroups.detect_support().mode}"
    )
    if POD_EXEC in handlers:
        print(
            f'"{POD_EXEC}": no config knob turns the zygote off: the daemon is started through a shim that takes '
            f"--zygote-socket off that handler's monitor command line"
        )
    if POD_DIRECT in handlers:
        print(f'"{POD_DIRECT}": the same shim takes --tracing-relay off: its monitors export over channels of their own')
    busy = bridge_in_use()
    if busy:
        print(f"bridge {BRIDGE} has interfaces {busy[:3]}: another benchmark run uses it; not starting", file=sys.stderr)
        return 1
    started = time.monotonic()
    report: dict[str, Any] = {"parameters": {"pods": args.counts, "handlers": handlers, "cgroup_parent": cgroup_parent,
                                             "bridge": BRIDGE, "subnet": SUBNET, "settle_s": SETTLE}}
    results: list[dict[str, Any]] = []
    problems: list[str] = []
    errors: list[str] = []
    leaks: list[str] = []
    bench: Bench | None = None
    daemon: ShimDaemon | None = None
    with tempfile.TemporaryDirectory(prefix="pycrio-bench-monmem-", ignore_cleanup_errors=True) as tmp:
        base = Path(tmp)
        registry = TestRegistry(base / "registry").start()
        receiver = OTLPReceiver().start() if args.tracing_rate is not None else None
        tracing = (receiver.endpoint, args.tracing_rate) if receiver is not None else None
        report["parameters"]["tracing_rate_per_million"] = args.tracing_rate
        try:
            t0 = time.monotonic()
            image = ImageBuilder(base / "images", registry).busybox("bench/busybox", "1")
            netdir = bridge_network(base / "net.d", NETWORK_NAME, BRIDGE, SUBNET)
            daemon = ShimDaemon(
                base / "d", args=["--log-level", "info"],
                config_text=daemon_config(registry, netdir, cgroup_parent, handlers, tracing),
                shimmed=handlers,
            )  # fmt: skip
            daemon.start()
            with daemon.channel() as ch:
                daemon.images(ch).PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image.reference)), timeout=300)
            bench = Bench(daemon, image.reference, base / "logs")
            procs = Processes(daemon)
            for handler in handlers:  # untimed warm-up: the bridge, first CNI and runc runs, the zygote
                warm = bench.start_pod(handler, f"warm-{handler}")
                bench.exec_in(handler, warm)
                if warm.pod_id:
                    bench.remove(warm.pod_id)
            print(f"image built, pushed, pulled, one warm-up pod per handler: {time.monotonic() - t0:.1f}s")
            for i, n in enumerate(args.counts):
                order = handlers if i % 2 == 0 else list(reversed(handlers))
                rounds = [round_for(bench, procs, handler, n, f"{i}") for handler in order]
                rounds.sort(key=lambda r: handlers.index(r["handler"]))
                results += rounds
                for r in rounds:
                    leaks += r["leftovers"]
                    if r["running"] != n:
                        errors.append(f"{r['handler']} at {n} pods: {r['running']}/{n} containers running when sampled")
                print_round_table(n, rounds)
                print(f"  ({time.monotonic() - started:.0f}s so far)", file=sys.stderr, flush=True)
            left = cgroups_left(cgroup_parent)
            if left:
                leaks.append(f"cgroups left under {cgroup_parent}: {left[:5]}")
        except Exception as exc:  # noqa: BLE001 - report, clean up, exit 0
            print(f"\nbenchmark aborted: {type(exc).__name__}: {exc}", flush=True)
            report["aborted"] = f"{type(exc).__name__}: {exc}"
        finally:
            if bench is not None:
                errors = bench.errors + errors
            problems = clean_up(base, bench, daemon, cgroup_parent)
            registry.stop()
            if receiver is not None:
                receiver.stop()
    duration = time.monotonic() - started
    if not results:
        print(f"no results; clean-up: {problems}")
        return 0
    rows = summary_rows(results, handlers)
    print_summary(rows, handlers)
    print("\nfailures: " + ("none" if not errors else ""))
    for error in errors:
        print(f"  {error}")
    print("leftovers after each round's removal: " + ("none" if not leaks else ""))
    for leak in leaks:
        print(f"  {leak}")
    print("clean-up: " + ("nothing forced" if not problems else "; ".join(problems)))
    checks = target_checks(rows, handlers, len(errors), len(leaks))
    print_checks(checks)
    print(f"\ntotal time {duration:.1f}s")
    if args.json:
        report.update({"rounds": to_json(results), "per_pod_mib": to_json(rows), "errors": errors, "leaks": leaks,
                       "cleanup": problems, "checks": checks, "duration_s": duration})
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
