"""Streaming benchmark of pycrio: exec round trips over SPDY and WebSocket against ExecSync, and
port-forward throughput over SPDY and WebSocket against a direct connection to the pod IP.

What is measured, all in one run, on one pycrio daemon (tracing off, its own socket, dirs, CNI
bridge `pycriobst0` 10.145.0.0/24 and cgroup parent /pycrio-bench-stream-<id>) with one pod (network
and IPC namespaces per pod, PID namespace per container, as kubelet asks) holding two containers
of the test busybox image (docker-registry on 127.0.0.1, pulled before anything is timed):
"sleeper" (`sleep 1000`, the exec target) and "httpd" (`busybox httpd -f -p 8080` serving one
`--size-mib` file of zeros it made with `busybox dd if=/dev/zero` at start).

1. Exec round trip: the wall time (time.perf_counter_ns around subprocess.run, output captured)
   of one real crictl v1.37 process running `sh -c :` in the sleeper:
     "exec spdy"        `crictl exec --transport spdy <id> sh -c :`
                        (Exec RPC, then the URL over SPDY/3.1, remotecommand v5);
     "exec websocket"   `crictl exec --transport websocket <id> sh -c :` (v5.channel.k8s.io);
     "exec -s"          `crictl exec -s <id> sh -c :` (the ExecSync RPC, no stream server);
     "crictl version"   `crictl version`: one Version RPC, the floor of a crictl process (start,
                        flag parsing, gRPC dial): subtract it to see what the call itself costs;
     "ExecSync gRPC"    ExecSync of `sh -c :` from this process over a long-lived channel: no
                        crictl at all, the floor of running a command in the container.
   `--rounds` rounds (after 2 untimed ones), the order rotated every round so drift on this shared
   2-core machine hits all alike. A run that does not exit 0 counts as a failure, not a sample.
   Also the daemon's CPU time (utime+stime of its own threads, /proc/<pid>/stat, summed over every
   timed call of the kind, divided by their number) and that of its reaped children (runc exec,
   cutime+cstime).
2. Port-forward throughput: GET of the file, a new connection per fetch, no proxy, from
     "direct"           http://<pod IP>:8080/ (the host reaches the pod over the CNI bridge);
     "pf spdy"          through a `crictl port-forward --transport spdy <pod> LOCAL:8080` started
                        once before the fetches and left running;
     "pf websocket"     the same with `--transport websocket` (SPDY tunnelled in a WebSocket);
   each with two clients: "httpx" (in this process, streaming, each chunk discarded; a Python
   client tops out at some hundreds of MiB/s here, so it also bounds "direct") and "curl" (body to
   /dev/null, its own time_total: the path's ceiling without a Python client on the same CPUs).
   `--fetches` fetches of each of the six (after 1 untimed one), rotated order. MiB/s = bytes /
   wall time of the whole GET (connect to last byte); the body must have exactly the file's size,
   else the fetch counts as a failure. The ratio is to "direct" with the same client. Per kind:
   the daemon's CPU seconds per GiB transferred (the stream server runs in a thread of the daemon
   and opens the pod-side socket itself; for "direct" the daemon is idle: the noise floor) and the
   crictl port-forward process's own CPU per GiB (the client side of the tunnel).

The client (crictl, httpx), the daemon, conmon and the container share the same 2 CPUs, and other
work may run on this machine at the same time: expect noise, compare ratios within one run.

Afterwards the pod is removed and the host checked (mounts under the bench dir, conmon processes,
veths on the bridge, iptables rules for the subnet), then everything goes: port-forward
processes, daemon, registry, bridge, host-local state (kept in the bench dir), cgroup parent.

Run from the repo root, as root:  .venv/bin/python bench/streaming.py [--rounds N] [--fetches N]
                                  [--size-mib N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import signal
import socket
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
import httpx  # noqa: E402

from bench.lifecycle import percentile, pod_config  # noqa: E402
from pycrio.cri import api_pb2, api_pb2_grpc  # noqa: E402
from pycrio.oci import cgroups  # noqa: E402
from tests.cni_fixture import bridge_network  # noqa: E402
from tests.harness import PycrioDaemon, tool  # noqa: E402
from tests.registry_fixture import ImageBuilder, TestRegistry, free_port  # noqa: E402

BRIDGE = "pycriobst0"
SUBNET = "10.145.0.0/24"
NETWORK_NAME = "pycrio-bench-stream"

EXEC_SPDY = "exec spdy"
EXEC_WS = "exec websocket"
EXEC_SYNC = "exec -s"
CRICTL_FLOOR = "crictl version"
GRPC_SYNC = "ExecSync gRPC"
EXEC_KINDS = (EXEC_SPDY, EXEC_WS, EXEC_SYNC, CRICTL_FLOOR, GRPC_SYNC)
EXEC_COMMAND = ["sh", "-c", ":"]
EXEC_WARMUP = 2

DIRECT = "direct"
PF_SPDY = "pf spdy"
PF_WS = "pf websocket"
TARGETS = (DIRECT, PF_SPDY, PF_WS)
HTTPX = "httpx"
CURL = "curl"
CLIENTS = (HTTPX, CURL)
FETCH_KINDS = tuple(f"{target} ({client})" for client in CLIENTS for target in TARGETS)
FETCH_WARMUP = 1
HTTP_PORT = 8080

RPC_TIMEOUT = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30
MIB = 1 << 20


# -- small helpers ---------------------------------------------------------------------------


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def fmt(v: float, width: int = 8, digits: int = 1) -> str:
    return f"{'-':>{width}}" if v is None or math.isnan(v) else f"{v:>{width}.{digits}f}"


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own utime+stime, reaped children's cutime+cstime) of `pid`, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after the ")": state is field 3, so utime (14) is index 11
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50, help="timed exec rounds (each: every exec kind once)")
    parser.add_argument("--fetches", type=int, default=5, help="timed fetches of the file per port-forward kind")
    parser.add_argument("--size-mib", type=int, default=100, help="size of the file served in the pod")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.fetches < 1 or args.size_mib < 1:
        parser.error("--rounds, --fetches and --size-mib must be >= 1")
    return args


# -- the pod ---------------------------------------------------------------------------------


class BenchPod:
    """One pod with a sleeper and an httpd container, and crictl calls against the daemon."""

    def __init__(self, daemon: PycrioDaemon, image: str, logs: Path) -> None:
        self.daemon = daemon
        self.image = image
        self.channel = daemon.channel()
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.config = pod_config("stream-bench", secrets.token_hex(8), logs)
        self.pod_id = ""
        self.sleeper = ""
        self.httpd = ""
        self.ip = ""

    def start(self, size_mib: int) -> None:
        self.pod_id = self.rt.RunPodSandbox(
            api_pb2.RunPodSandboxRequest(config=self.config), timeout=RPC_TIMEOUT
        ).pod_sandbox_id
        status = self.rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=self.pod_id), timeout=RPC_TIMEOUT)
        self.ip = status.status.network.ip
        self.sleeper = self._container("sleeper", ["sleep", "1000"])
        serve = (
            f"mkdir -p /www && busybox dd if=/dev/zero of=/www/blob bs={MIB} count={size_mib} 2>/dev/null"
            f" && exec busybox httpd -f -p {HTTP_PORT} -h /www"
        )
        self.httpd = self._container("httpd", ["sh", "-c", serve])

    def _container(self, name: str, command: list[str]) -> str:
        ns = api_pb2.NamespaceOption(network=api_pb2.POD, pid=api_pb2.CONTAINER, ipc=api_pb2.POD)
        config = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=name, attempt=0),
            image=api_pb2.ImageSpec(image=self.image),
            command=command,
            log_path=f"{name}.log",
            linux=api_pb2.LinuxContainerConfig(
                security_context=api_pb2.LinuxContainerSecurityContext(namespace_options=ns)
            ),
        )
        cid = self.rt.CreateContainer(
            api_pb2.CreateContainerRequest(pod_sandbox_id=self.pod_id, config=config, sandbox_config=self.config),
            timeout=RPC_TIMEOUT,
        ).container_id
        self.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
        return cid

    def crictl_argv(self, *args: str) -> list[str]:
        return [tool("crictl"), "--runtime-endpoint", self.daemon.endpoint, "--timeout", "20s", *args]

    def remove(self) -> None:
        if self.pod_id:
            self.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=self.pod_id), timeout=RPC_TIMEOUT)
            self.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=self.pod_id), timeout=RPC_TIMEOUT)
            self.pod_id = ""
        self.channel.close()


def wait_for_http(url: str, size: int, timeout: float = 60.0) -> None:
    """Until `url` answers with Content-Length `size` (the file is written before httpd starts)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            reply = httpx.head(url, timeout=5, trust_env=False)
            if reply.status_code == 200 and int(reply.headers.get("content-length", -1)) == size:
                return
            last = f"HTTP {reply.status_code}, content-length {reply.headers.get('content-length')}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not serve {size} bytes within {timeout}s (last: {last})")


# -- exec round trips ------------------------------------------------------------------------


@dataclass
class ExecResults:
    ns: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in EXEC_KINDS})
    daemon_cpu_s: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in EXEC_KINDS})
    children_cpu_s: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in EXEC_KINDS})
    failures: list[str] = field(default_factory=list)


def exec_once(pod: BenchPod, kind: str) -> tuple[int, str | None]:
    """(wall ns, failure or None) of one call of `kind`."""
    if kind == GRPC_SYNC:
        t0 = time.perf_counter_ns()
        try:
            reply = pod.rt.ExecSync(
                api_pb2.ExecSyncRequest(container_id=pod.sleeper, cmd=EXEC_COMMAND, timeout=30), timeout=RPC_TIMEOUT
            )
        except grpc.RpcError as exc:
            return time.perf_counter_ns() - t0, f"{exc.code().name}: {exc.details()}"
        ns = time.perf_counter_ns() - t0
        return ns, None if reply.exit_code == 0 else f"exit {reply.exit_code}: {reply.stderr[:200]!r}"
    if kind == CRICTL_FLOOR:
        argv = pod.crictl_argv("version")
    elif kind == EXEC_SYNC:
        argv = pod.crictl_argv("exec", "-s", pod.sleeper, *EXEC_COMMAND)
    else:
        transport = "spdy" if kind == EXEC_SPDY else "websocket"
        argv = pod.crictl_argv("exec", "--transport", transport, pod.sleeper, *EXEC_COMMAND)
    t0 = time.perf_counter_ns()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return time.perf_counter_ns() - t0, "no exit within 60 s"
    ns = time.perf_counter_ns() - t0
    if done.returncode != 0:
        return ns, f"exit {done.returncode}: {done.stderr.strip()[-300:]!r}"
    return ns, None


def run_exec(pod: BenchPod, rounds: int, daemon_pid: int) -> ExecResults:
    results = ExecResults()
    for w in range(EXEC_WARMUP):
        for kind in EXEC_KINDS:
            _, failure = exec_once(pod, kind)
            if failure:
                progress(f"  warm-up {kind}: {failure}")
    t0 = time.monotonic()
    for i in range(rounds):
        shift = i % len(EXEC_KINDS)
        for kind in EXEC_KINDS[shift:] + EXEC_KINDS[:shift]:
            own0, children0 = cpu_seconds(daemon_pid)
            ns, failure = exec_once(pod, kind)
            own1, children1 = cpu_seconds(daemon_pid)
            if failure:
                results.failures.append(f"round {i} {kind}: {failure}")
                progress(f"  round {i} {kind}: {failure}")
                continue
            results.ns[kind].append(ns)
            results.daemon_cpu_s[kind] += own1 - own0
            results.children_cpu_s[kind] += children1 - children0
        if (i + 1) % 10 == 0 or i + 1 == rounds:
            progress(f"  exec: {i + 1}/{rounds} rounds ({time.monotonic() - t0:.1f}s)")
    return results


def summarize_exec(results: ExecResults) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for kind in EXEC_KINDS:
        ms = [v / 1e6 for v in results.ns[kind]]
        n = len(ms)
        rows[kind] = {
            "n": n,
            "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99),
            "min_ms": min(ms) if ms else math.nan,
            "daemon_cpu_ms_per_call": results.daemon_cpu_s[kind] * 1000 / n if n else math.nan,
            "children_cpu_ms_per_call": results.children_cpu_s[kind] * 1000 / n if n else math.nan,
        }
    sync, floor = rows[EXEC_SYNC], rows[CRICTL_FLOOR]
    for kind in EXEC_KINDS:
        row = rows[kind]
        row["p50_vs_exec_s"] = ratio(row["p50_ms"], sync["p50_ms"])
        row["p99_vs_exec_s"] = ratio(row["p99_ms"], sync["p99_ms"])
        row["p50_minus_crictl_floor_ms"] = row["p50_ms"] - floor["p50_ms"] if kind not in (CRICTL_FLOOR, GRPC_SYNC) else math.nan
    return rows


# -- port-forward throughput -----------------------------------------------------------------


class PortForward:
    """A `crictl port-forward --transport T <pod> LOCAL:8080` process, running until stopped."""

    def __init__(self, pod: BenchPod, transport: str, log: Path) -> None:
        self.transport = transport
        self.local_port = free_port()
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                pod.crictl_argv("port-forward", "--transport", transport, pod.pod_id, f"{self.local_port}:{HTTP_PORT}"),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}/blob"

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"crictl port-forward --transport {self.transport} exited {self.proc.returncode}: {self.output()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.local_port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"crictl port-forward --transport {self.transport} not listening within {timeout}s")

    def output(self) -> str:
        return self.log.read_text(errors="replace").strip()[-500:]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class FetchResults:
    seconds: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in FETCH_KINDS})
    bytes: dict[str, int] = field(default_factory=lambda: {k: 0 for k in FETCH_KINDS})
    daemon_cpu_s: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in FETCH_KINDS})
    crictl_cpu_s: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in FETCH_KINDS})
    failures: list[str] = field(default_factory=list)


def kind_of(kind: str) -> tuple[str, str]:
    """(target, client) of a fetch kind like "pf spdy (httpx)"."""
    target, client = kind.rsplit(" (", 1)
    return target, client.rstrip(")")


def fetch(url: str, size: int, client: str) -> tuple[float, int, str | None]:
    """(seconds, body bytes, failure or None) of one GET of `url` on a fresh connection."""
    return fetch_curl(url, size) if client == CURL else fetch_httpx(url, size)


def fetch_curl(url: str, size: int) -> tuple[float, int, str | None]:
    """curl's own connect-to-last-byte time (its process start is not counted), body discarded."""
    done = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    try:
        code, received, seconds = done.stdout.split()
    except ValueError:
        return math.nan, 0, f"curl exit {done.returncode}: {done.stderr.strip()[-300:]}"
    if done.returncode != 0 or code != "200":
        return float(seconds), int(received), f"curl exit {done.returncode}, HTTP {code}: {done.stderr.strip()[-300:]}"
    return float(seconds), int(received), None if int(received) == size else f"{received} bytes received, {size} expected"


def fetch_httpx(url: str, size: int) -> tuple[float, int, str | None]:
    received = 0
    t0 = time.perf_counter()
    try:
        with httpx.Client(trust_env=False, timeout=httpx.Timeout(60.0)) as client:
            with client.stream("GET", url) as reply:
                if reply.status_code != 200:
                    return time.perf_counter() - t0, received, f"HTTP {reply.status_code}"
                # chunks as httpcore reads them (64 KiB): a chunk_size makes httpx re-buffer, slower
                for chunk in reply.iter_raw():
                    received += len(chunk)
    except httpx.HTTPError as exc:
        return time.perf_counter() - t0, received, f"{type(exc).__name__}: {exc} after {received} bytes"
    seconds = time.perf_counter() - t0
    return seconds, received, None if received == size else f"{received} bytes received, {size} expected"


def run_fetches(
    pod: BenchPod, forwards: dict[str, PortForward], fetches: int, size: int, daemon_pid: int
) -> FetchResults:
    results = FetchResults()
    urls = {DIRECT: f"http://{pod.ip}:{HTTP_PORT}/blob", **{k: f.url for k, f in forwards.items()}}
    for w in range(FETCH_WARMUP):
        for kind in FETCH_KINDS:
            target, client = kind_of(kind)
            _, _, failure = fetch(urls[target], size, client)
            if failure:
                progress(f"  warm-up fetch {kind}: {failure}")
    t0 = time.monotonic()
    for i in range(fetches):
        shift = i % len(FETCH_KINDS)
        for kind in FETCH_KINDS[shift:] + FETCH_KINDS[:shift]:
            target, client = kind_of(kind)
            forward = forwards.get(target)
            crictl0 = cpu_seconds(forward.proc.pid)[0] if forward else 0.0
            own0, _ = cpu_seconds(daemon_pid)
            seconds, received, failure = fetch(urls[target], size, client)
            own1, _ = cpu_seconds(daemon_pid)
            crictl1 = cpu_seconds(forward.proc.pid)[0] if forward and forward.proc.poll() is None else crictl0
            if failure:
                results.failures.append(f"fetch {i} {kind}: {failure}")
                progress(f"  fetch {i} {kind}: {failure}")
                continue
            results.seconds[kind].append(seconds)
            results.bytes[kind] += received
            results.daemon_cpu_s[kind] += own1 - own0
            results.crictl_cpu_s[kind] += crictl1 - crictl0
            progress(f"  fetch {i} {kind}: {received / MIB / seconds:.0f} MiB/s ({time.monotonic() - t0:.1f}s)")
    return results


def summarize_fetches(results: FetchResults, size: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for kind in FETCH_KINDS:
        rates = [size / MIB / s for s in results.seconds[kind]]
        gib = results.bytes[kind] / GIB
        rows[kind] = {
            "n": len(rates),
            "median_mib_s": percentile(rates, 50),
            "min_mib_s": min(rates) if rates else math.nan,
            "max_mib_s": max(rates) if rates else math.nan,
            "daemon_cpu_s_per_gib": results.daemon_cpu_s[kind] / gib if gib else math.nan,
            "crictl_cpu_s_per_gib": results.crictl_cpu_s[kind] / gib if gib and kind_of(kind)[0] != DIRECT else math.nan,
        }
    for kind in FETCH_KINDS:
        direct = f"{DIRECT} ({kind_of(kind)[1]})"
        rows[kind]["vs_direct"] = ratio(rows[kind]["median_mib_s"], rows[direct]["median_mib_s"])
    return rows


# -- printing --------------------------------------------------------------------------------


def print_tables(exec_rows: dict[str, Any], fetch_rows: dict[str, Any], args: argparse.Namespace) -> None:
    header = (
        f"{'exec round trip (ms)':<22} {'n':>4} {'p50':>8} {'p99':>8} {'min':>8} {'p50/-s':>7} {'p99/-s':>7} "
        f"{'p50-floor':>9} {'dmn cpu':>8} {'child':>7}"
    )
    print(f"\n{header}\n{'-' * len(header)}")
    for kind in EXEC_KINDS:
        r = exec_rows[kind]
        print(
            f"{kind:<22} {r['n']:>4d} {fmt(r['p50_ms'])} {fmt(r['p99_ms'])} {fmt(r['min_ms'])} "
            f"{fmt(r['p50_vs_exec_s'], 7, 2)} {fmt(r['p99_vs_exec_s'], 7, 2)} {fmt(r['p50_minus_crictl_floor_ms'], 9)} "
            f"{fmt(r['daemon_cpu_ms_per_call'])} {fmt(r['children_cpu_ms_per_call'], 7)}"
        )
    print(
        f"(`{' '.join(EXEC_COMMAND)}` in the sleeper; p50/-s, p99/-s: ratio to `crictl exec -s` (ExecSync); "
        f"p50-floor: p50 minus the `crictl version` p50\n (the cost of a crictl process); dmn cpu / child: "
        f"daemon CPU ms per call, own threads / reaped children such as runc exec)"
    )
    header = f"{f'port-forward, {args.size_mib} MiB GET':<26} {'n':>3} {'MiB/s':>8} {'min':>8} {'max':>8} {'/direct':>8} {'dmn s/GiB':>10} {'crictl s/GiB':>12}"
    print(f"\n{header}\n{'-' * len(header)}")
    for kind in FETCH_KINDS:
        r = fetch_rows[kind]
        print(
            f"{kind:<26} {r['n']:>3d} {fmt(r['median_mib_s'])} {fmt(r['min_mib_s'])} {fmt(r['max_mib_s'])} "
            f"{fmt(r['vs_direct'], 8, 3)} {fmt(r['daemon_cpu_s_per_gib'], 10, 2)} {fmt(r['crictl_cpu_s_per_gib'], 12, 2)}"
        )
    print(
        "(MiB/s: median over the fetches, a fresh connection each (httpx: connect to last byte timed here; curl: its\n"
        " time_total); /direct: ratio of medians to the pod IP with the same client; dmn s/GiB: daemon CPU seconds\n"
        " per GiB through it (direct: the daemon idle); crictl s/GiB: the crictl port-forward process's own)"
    )


# -- leaks and clean-up ----------------------------------------------------------------------


def leaks(base: Path) -> list[str]:
    """What of the bench's pod is still on the host once the pod was removed."""
    found: list[str] = []
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(base) in line]
    if mounts:
        found.append(f"{len(mounts)} mounts under {base}: {mounts[:5]}")
    conmons = [c for c in subprocess.run(["pgrep", "-af", "conmon"], capture_output=True, text=True).stdout.splitlines() if str(base) in c]
    if conmons:
        found.append(f"{len(conmons)} conmon processes: {[c.split()[0] for c in conmons]}")
    veths = subprocess.run(["ip", "-o", "link", "show", "master", BRIDGE], capture_output=True, text=True).stdout
    if veths.strip():
        found.append(f"interfaces still on {BRIDGE}: {[line.split(':')[1].strip() for line in veths.splitlines()]}")
    prefix = SUBNET.split("/")[0].rsplit(".", 1)[0] + "."
    rules = [r for r in subprocess.run(["iptables-save"], capture_output=True, text=True).stdout.splitlines() if prefix in r]
    if rules:
        found.append(f"{len(rules)} iptables rules for {SUBNET}: {rules[:3]}")
    return found


def clean_up(base: Path, daemon: PycrioDaemon | None, pod: BenchPod | None, forwards: dict[str, PortForward],
             cgroup_parent: str) -> dict[str, Any]:
    """Remove everything the bench made; what had to be forced is reported."""
    report: dict[str, Any] = {"problems": []}
    report["port_forward_exit_codes"] = {k: f.stop() for k, f in forwards.items()}
    if pod is not None:
        try:
            pod.remove()
        except grpc.RpcError as exc:
            report["problems"].append(f"removing the pod: {exc.code().name}: {exc.details()}")
    if daemon is not None:
        if daemon.alive():
            listed = json.loads(daemon.crictl("pods", "-o", "json", check=False).stdout or "{}")
            for item in listed.get("items", []):
                daemon.crictl("rmp", "-f", item["id"], check=False)
                report["problems"].append(f"force-removed pod {item['id']}")
        report["daemon_exit_code"] = daemon.stop()
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        if str(base) in line:
            target = line.split()[4]
            subprocess.run(["umount", "-l", target], capture_output=True)
            report["problems"].append(f"unmounted leftover {target}")
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
    try:
        cgroups.remove_cgroup(cgroup_parent)
    except OSError as exc:
        report["problems"].append(f"cgroup parent {cgroup_parent}: {exc}")
    return report


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Registry, daemon, pod; exec rounds, then fetches; print; exit 0 whatever the numbers."""
    args = parse_args(argv)
    bench_id = secrets.token_hex(4)
    cgroup_parent = f"/pycrio-bench-stream-{bench_id}"
    size = args.size_mib * MIB
    crictl_version = subprocess.run([tool("crictl"), "--version"], capture_output=True, text=True).stdout.strip()
    print(
        f"pycrio streaming benchmark: {args.rounds} exec rounds (+{EXEC_WARMUP} warm-up) of {len(EXEC_KINDS)} kinds, "
        f"{args.fetches} fetches (+{FETCH_WARMUP} warm-up) of a {args.size_mib} MiB file per port-forward kind"
    )
    print(
        f"crictl --version: {crictl_version}, python {platform.python_version()}, httpx {httpx.__version__}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}, bridge {BRIDGE} {SUBNET}, cgroup parent {cgroup_parent}"
    )
    started = time.monotonic()
    report: dict[str, Any] = {
        "parameters": {"rounds": args.rounds, "fetches": args.fetches, "size_mib": args.size_mib,
                       "exec_command": EXEC_COMMAND, "bridge": BRIDGE, "subnet": SUBNET,
                       "cgroup_parent": cgroup_parent, "crictl": crictl_version,
                       "load_at_start": os.getloadavg()[0]},
    }  # fmt: skip
    daemon: PycrioDaemon | None = None
    pod: BenchPod | None = None
    forwards: dict[str, PortForward] = {}
    exec_results: ExecResults | None = None
    fetch_results: FetchResults | None = None
    leaked: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pycrio-bench-stream-", ignore_cleanup_errors=True) as tmp:
        base = Path(tmp)
        registry = TestRegistry(base / "registry").start()
        try:
            t0 = time.monotonic()
            image = ImageBuilder(base / "images", registry).busybox("bench/busybox", "1")
            netdir = bridge_network(base / "net.d", NETWORK_NAME, BRIDGE, SUBNET, ipam_dir=base / "ipam",
                                    filename="10-bench-stream.conflist")  # fmt: skip
            daemon = PycrioDaemon(
                base / "daemon", args=["--log-level", "info"],
                config_text=(
                    f'[pycrio.image]\ninsecure_registries = ["{registry.address}"]\n'
                    f'[pycrio.network]\nnetwork_dir = "{netdir}"\n'
                    f'[pycrio.runtime]\npod_cgroup_parent = "{cgroup_parent}"\n'
                ),
            ).start()  # fmt: skip
            assert daemon.proc is not None
            daemon_pid = daemon.proc.pid
            daemon.crictl("pull", image.reference)
            pod = BenchPod(daemon, image.reference, base / "logs")
            pod.start(args.size_mib)
            wait_for_http(f"http://{pod.ip}:{HTTP_PORT}/blob", size)
            print(f"image pulled, pod {pod.pod_id[:13]} at {pod.ip} serving {args.size_mib} MiB, in "
                  f"{time.monotonic() - t0:.1f}s (untimed)")  # fmt: skip

            progress("exec round trips ...")
            exec_results = run_exec(pod, args.rounds, daemon_pid)

            progress("port-forward throughput ...")
            for kind, transport in ((PF_SPDY, "spdy"), (PF_WS, "websocket")):
                forwards[kind] = PortForward(pod, transport, base / f"port-forward-{transport}.log")
            for forward in forwards.values():
                forward.wait_listening()
            fetch_results = run_fetches(pod, forwards, args.fetches, size, daemon_pid)
            for kind, forward in forwards.items():
                if forward.proc.poll() is not None:
                    fetch_results.failures.append(f"{kind}: crictl exited {forward.proc.returncode}: {forward.output()}")
            for kind, forward in list(forwards.items()):
                forward.stop()
            pod.remove()
            leaked = leaks(base)
        except Exception as exc:  # noqa: BLE001 - report, clean up, exit 0
            print(f"\nbenchmark aborted: {type(exc).__name__}: {exc}", flush=True)
            report["aborted"] = f"{type(exc).__name__}: {exc}"
            if daemon is not None:
                report["daemon_log_tail"] = daemon.logs()[-3000:]
        finally:
            cleanup = clean_up(base, daemon, pod, forwards, cgroup_parent)
            registry.stop()
    duration = time.monotonic() - started

    exec_rows = summarize_exec(exec_results) if exec_results else None
    fetch_rows = summarize_fetches(fetch_results, size) if fetch_results else None
    if exec_rows and fetch_rows:
        print_tables(exec_rows, fetch_rows, args)
    failures = (exec_results.failures if exec_results else []) + (fetch_results.failures if fetch_results else [])
    print("\nfailures: " + ("none" if not failures else str(len(failures))))
    for failure in failures[:20]:
        print(f"  {failure}")
    print("leaks after RemovePodSandbox: " + ("none" if not leaked else "; ".join(leaked)))
    print(f"clean-up: daemon exit {cleanup.get('daemon_exit_code')}, port-forward exits "
          f"{cleanup.get('port_forward_exit_codes')}" + (f", problems: {cleanup['problems']}" if cleanup["problems"] else ""))  # fmt: skip
    print(f"total time {duration:.1f}s")

    report.update({
        "exec": exec_rows, "port_forward": fetch_rows, "failures": failures, "leaks": leaked, "cleanup": cleanup,
        "exec_ms": {k: [v / 1e6 for v in exec_results.ns[k]] for k in EXEC_KINDS} if exec_results else None,
        "fetch_s": fetch_results.seconds if fetch_results else None,
        "duration_s": duration,
    })  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
