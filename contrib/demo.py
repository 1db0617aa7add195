#!/usr/bin/env python3
"""End-to-end tracing demo: crictl -> pycrio -> Jaeger, seen in the real Jaeger UI.

`make demo` runs this with the project's virtualenv. It starts Jaeger with contrib/jaeger.yaml
(OTLP in, the Collector's debug exporter printing every span, in-memory store, the real Jaeger UI
from build/jaeger-ui), a loopback docker-registry with a busybox image, and pycrio tracing every
call at log level debug. Then, each as a traced crictl command: `ps`, `pull`, `run` (a pod start:
RunPodSandbox + CreateContainer + StartContainer in one trace), `exec -s`, `stopp`, `rmp`. It
stops pycrio (which flushes its spans), reads the traces back from Jaeger's query API, prints the
debug exporter's block of the ListContainers span (as CRI-O's tracing tutorial shows it), the span
trees, the Jaeger links, and saves a headless-Chromium screenshot of the pod-start trace's timeline
to build/demo/trace.png (and docs/demo-trace.png, the README's picture).

    make demo                              # Jaeger is stopped at the end
    make demo DEMO_ARGS=--keep-jaeger      # Jaeger stays up so the printed links can be opened
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable, TypeVar

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
sys.path.insert(0, str(ROOT))

from pycrio.oci.cgroups import remove_cgroup  # noqa: E402 (after the path set-up)
from tests.jaeger_fixture import (  # noqa: E402
    JAEGER_CONFIG, UI_ASSETS, UI_PLACEHOLDER_MARK, chromium, debug_span_block, find_chromium,
)
from tests.registry_fixture import ImageBuilder, TestRegistry  # noqa: E402

DEMO_PICTURE = ROOT / "build" / "demo" / "trace.png"
README_PICTURE = ROOT / "docs" / "demo-trace.png"

OTLP_GRPC = ("127.0.0.1", 4317)
QUERY_PORT = 16686
QUERY_URL = f"http://127.0.0.1:{QUERY_PORT}"
UI_URL = f"http://localhost:{QUERY_PORT}"
TRACING_ENDPOINT = f"{OTLP_GRPC[0]}:{OTLP_GRPC[1]}"

CRICTL_SERVICE = "cri-tools"
PYCRIO_SERVICE = "pycrio"
LIST_CONTAINERS = "/runtime.v1.RuntimeService/ListContainers"

DEMO_IMAGE = "demo/busybox"
POD_CGROUP_PARENT = "/pycrio-demo"
# The traced crictl commands, in the order the demo runs them (each is one trace).
DEMO_COMMANDS = ("ps", "pull", "run", "exec", "stopp", "rmp")

JAEGER_READY_TIMEOUT = 30.0
PYCRIO_READY_TIMEOUT = 20.0
PYCRIO_STOP_TIMEOUT = 20.0
TRACE_TIMEOUT = 30.0
KEEP_HINT = "run `make demo DEMO_ARGS=--keep-jaeger` to keep the UI up"
SCREENSHOT_WIDTH = 1400
SCREENSHOT_BASE_HEIGHT = 240
SCREENSHOT_ROW_HEIGHT = 29
SCREENSHOT_MAX_HEIGHT = 2400

T = TypeVar("T")


class DemoError(Exception):
    """A failed step, phrased as one line; `log` is a file whose tail explains it."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


@dataclass
class Proc:
    """A background process the demo started, with the file its output goes to."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path


# ---------------------------------------------------------------- small helpers


def say(message: str = "") -> None:
    """Print a line right away (the children's output is interleaved with ours)."""
    print(message, flush=True)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, or a note that it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def get_json(path: str, timeout: float = 3.0) -> Any:
    """GET a path of Jaeger's HTTP query API and decode the JSON answer."""
    with urllib.request.urlopen(QUERY_URL + path, timeout=timeout) as resp:
        return json.load(resp)


def get_text(path: str, timeout: float = 3.0) -> str:
    """GET a path of Jaeger's HTTP server as text."""
    with urllib.request.urlopen(QUERY_URL + path, timeout=timeout) as resp:
        return resp.read().decode(errors="replace")


def child_env() -> dict[str, str]:
    """Our environment without OTEL_*/PYCRIO_* variables, so only the demo's flags apply."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PYCRIO_"))}


def wait_until(
    what: str, check: Callable[[], T | None], timeout: float, proc: Proc | None = None, log: Path | None = None
) -> T:
    """Poll `check` until it returns a value; fail if `proc` dies or `timeout` passes.

    The error names `log` (default: `proc`'s log) so its tail can be shown.
    """
    log = log or (proc.log if proc else None)
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        if proc is not None and proc.popen.poll() is not None:
            raise DemoError(f"{proc.name} exited with code {proc.popen.returncode} while waiting for {what}", proc.log)
        try:
            result = check()
        except (OSError, ValueError) as exc:  # connection refused, HTTP error, bad JSON
            last_error = f" (last error: {exc})"
        else:
            if result is not None:
                return result
        if time.monotonic() >= deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}{last_error}", log)
        time.sleep(0.25)


def require(tool: str) -> str:
    """The path of a tool in .venv/bin, or a DemoError telling how to build it."""
    path = BIN / tool
    if not path.is_file():
        raise DemoError(f"{path} not found; run `make install jaeger` first")
    return str(path)


def start(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    """Start a background process in its own session (Ctrl-C reaches only the demo, which cleans up)."""
    with log.open("wb") as out:
        try:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**child_env(), **(env or {})}, start_new_session=True,
            )
        except OSError as exc:
            raise DemoError(f"cannot start {name}: {exc}") from None
    return Proc(name, popen, log)


def stop(proc: Proc, timeout: float) -> int:
    """SIGTERM a process and wait; SIGKILL it if it does not exit within `timeout` seconds."""
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
            say(f"{proc.name} did not stop within {timeout:.0f}s of SIGTERM; killed it")
    return proc.popen.returncode


# ---------------------------------------------------------------- Jaeger


def query_port_state() -> str:
    """'free' if nothing listens on 16686, 'jaeger' if Jaeger's query API answers there, else 'other'."""
    if not port_open(QUERY_PORT):
        return "free"
    try:
        answer = get_json("/api/services")
    except (OSError, ValueError):
        return "other"
    return "jaeger" if isinstance(answer, dict) and "data" in answer else "other"


def jaeger_ready() -> bool | None:
    """True once Jaeger's query API answers and its OTLP/gRPC receiver accepts connections."""
    return True if query_port_state() == "jaeger" and port_open(OTLP_GRPC[1]) else None


def ensure_jaeger(logdir: Path) -> Proc | None:
    """Reuse a running Jaeger or start `.venv/bin/jaeger --config contrib/jaeger.yaml`; None if reused."""
    state = query_port_state()
    if state == "jaeger":
        if not port_open(OTLP_GRPC[1]):
            raise DemoError(f"a Jaeger answers on :{QUERY_PORT} but nothing accepts OTLP/gRPC on {TRACING_ENDPOINT}")
        say(f"==> reusing the Jaeger already answering on {UI_URL} (its span printout is in its own log)")
        return None
    if state == "other":
        raise DemoError(f"port {QUERY_PORT} is taken by something that is not Jaeger (GET /api/services failed); stop it first")
    if port_open(OTLP_GRPC[1]):
        raise DemoError(f"port {OTLP_GRPC[1]} (OTLP/gRPC) is taken by another process (a Collector?) while no Jaeger "
                        f"answers on :{QUERY_PORT}; stop it first")
    if not (UI_ASSETS / "index.html").is_file():
        raise DemoError(f"{UI_ASSETS}/index.html not found; run `make jaeger` first (it fetches the Jaeger UI)")
    argv = [require("jaeger"), "--config", str(JAEGER_CONFIG)]
    jaeger = start("jaeger", argv, logdir / "jaeger.log", {"PYCRIO_JAEGER_UI_ASSETS": str(UI_ASSETS)})
    say(f"==> starting Jaeger with {JAEGER_CONFIG.relative_to(ROOT)} (pid {jaeger.popen.pid}, log {jaeger.log}):")
    say(f"    OTLP on {TRACING_ENDPOINT}, debug exporter, in-memory store, the Jaeger UI on {UI_URL}")
    wait_until(f"Jaeger's query API on :{QUERY_PORT} and OTLP/gRPC on {TRACING_ENDPOINT}",
               jaeger_ready, JAEGER_READY_TIMEOUT, jaeger)
    return jaeger


def ui_is_placeholder() -> bool:
    """Whether this Jaeger serves a placeholder page instead of the web UI."""
    try:
        return UI_PLACEHOLDER_MARK in get_text("/")
    except OSError:
        return False


# ---------------------------------------------------------------- a registry with an image


def start_registry(workdir: Path) -> tuple[TestRegistry, str]:
    """A docker-registry on loopback with a busybox image built by umoci; (registry, image reference)."""
    registry = TestRegistry(workdir / "registry").start()
    image = ImageBuilder(workdir / "images", registry).busybox(DEMO_IMAGE, "1.0")
    say(f"==> registry {registry.url} (docker-registry) with {image.reference} (busybox, built with umoci, pushed with skopeo)")
    return registry, image.reference


# ---------------------------------------------------------------- pycrio and crictl


def crictl_base(workdir: Path, sock: Path) -> list[str]:
    """crictl with its own (empty-ish) config file so /etc/crictl.yaml does not interfere."""
    config = workdir / "crictl.yaml"
    if not config.exists():
        config.write_text(f"runtime-endpoint: unix://{sock}\nimage-endpoint: unix://{sock}\ntimeout: 30\n")
    return [require("crictl"), "--config", str(config),
            "--runtime-endpoint", f"unix://{sock}", "--image-endpoint", f"unix://{sock}"]


def start_pycrio(workdir: Path, sock: Path, registry: str) -> Proc:
    """pycrio with every call traced, all its paths inside `workdir`, at debug so calls carry log events."""
    config = workdir / "pycrio.conf"
    config.write_text(
        f'[pycrio.image]\ninsecure_registries = ["{registry}"]\n'
        f'[pycrio.runtime]\npod_cgroup_parent = "{POD_CGROUP_PARENT}"\n'
    )
    (workdir / "conf.d").mkdir(exist_ok=True)
    argv = [
        require("pycrio"), "--config", str(config), "--config-dir", str(workdir / "conf.d"),
        "--root", str(workdir / "root"), "--runroot", str(workdir / "run"), "--listen", str(sock),
        "--log-level", "debug", "--enable-tracing", "--tracing-endpoint", TRACING_ENDPOINT,
        "--tracing-sampling-rate-per-million", "1000000",
    ]
    return start("pycrio", argv, workdir / "pycrio.log")


def pycrio_status(sock: Path, output: str = "text") -> str:
    """`pycrio status`: the daemon's conditions and span export counters, over its socket."""
    argv = [require("pycrio"), "--listen", str(sock), "status", "-o", output]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=child_env())
    if done.returncode != 0:
        raise DemoError(f"pycrio status failed: {done.stderr.strip()}")
    return done.stdout


def spans_exported(sock: Path) -> bool | None:
    """True once pycrio reports spans exported to the collector, else None (keep waiting)."""
    export = json.loads(pycrio_status(sock, "json")).get("tracing", {}).get("export", {})
    return True if export.get("spans_exported", 0) > 0 else None


def crictl_version(workdir: Path, sock: Path) -> str | None:
    """`crictl version` output once pycrio answers on the socket, else None."""
    if not sock.exists():
        return None
    argv = crictl_base(workdir, sock) + ["--timeout", "1s", "--max-retries", "0", "version"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, env=child_env())
    except subprocess.TimeoutExpired:
        return None
    return done.stdout if done.returncode == 0 else None


def crictl_traced(workdir: Path, sock: Path, *args: str) -> str:
    """Run `crictl --enable-tracing ARGS` (spans to Jaeger, W3C context to pycrio); its stdout."""
    say(f"==> crictl --enable-tracing {' '.join(args)}")
    argv = crictl_base(workdir, sock) + ["--enable-tracing", "--tracing-endpoint", TRACING_ENDPOINT, *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=child_env())
    except subprocess.TimeoutExpired:
        raise DemoError(f"crictl {args[0]} did not finish within 120s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DemoError(f"crictl {args[0]} failed with code {done.returncode}: {last}")
    for line in done.stdout.rstrip("\n").splitlines():
        say(f"    {line}")
    return done.stdout.strip()


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


def pod_files(workdir: Path, image: str) -> tuple[Path, Path]:
    """The CRI pod and container configs `crictl run` takes (a busybox that stops on SIGTERM)."""
    pod = write_json(workdir / "pod.json", {
        "metadata": {"name": "demo", "namespace": "default", "uid": "pycrio-demo-pod", "attempt": 0},
        "hostname": "demo",
        "log_directory": str(workdir / "logs"),
        "linux": {},
    })
    container = write_json(workdir / "container.json", {
        "metadata": {"name": "shell"},
        "image": {"image": image},
        "command": ["sh", "-c", "trap 'exit 0' TERM; echo started; while true; do sleep 1; done"],
        "log_path": "shell.log",
    })
    return pod, container


# ---------------------------------------------------------------- the traces


def spans_of(trace: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(service name, span) for every span of a Jaeger JSON trace."""
    services = {pid: p["serviceName"] for pid, p in trace.get("processes", {}).items()}
    return [(services.get(s["processID"], "?"), s) for s in trace.get("spans", [])]


def find_command_trace(command: str, since_us: int) -> dict[str, Any] | None:
    """The newest trace, started after `since_us`, of crictl subcommand `command` that holds pycrio spans."""
    query = urllib.parse.urlencode({"service": CRICTL_SERVICE, "operation": command, "start": since_us,
                                    "limit": 20, "lookback": "1h"})
    best: tuple[int, dict[str, Any]] | None = None
    for trace in get_json(f"/api/traces?{query}").get("data") or []:
        spans = spans_of(trace)
        if not any(service == PYCRIO_SERVICE for service, _ in spans):
            continue
        started = min(s["startTime"] for _, s in spans)
        if best is None or started > best[0]:
            best = (started, trace)
    return best[1] if best else None


def settled(trace: dict[str, Any]) -> dict[str, Any]:
    """The trace read again by id until its span count stops growing (batches arrive apart)."""
    count = -1
    for _ in range(8):
        time.sleep(0.5)
        try:
            trace = (get_json(f"/api/traces/{trace['traceID']}").get("data") or [trace])[0]
        except (OSError, ValueError):
            return trace
        if len(trace["spans"]) == count:
            break
        count = len(trace["spans"])
    return trace


def tag(span: dict[str, Any], key: str) -> Any:
    """The value of a span tag, or None."""
    return next((t["value"] for t in span.get("tags", []) if t["key"] == key), None)


def log_events(span: dict[str, Any]) -> int:
    """How many span events named `log` (pycrio's log records) a span carries."""
    return sum(1 for entry in span.get("logs", [])
               if any(f["key"] == "event" and f["value"] == "log" for f in entry.get("fields", [])))


def span_tree(trace: dict[str, Any]) -> list[tuple[int, str, dict[str, Any]]]:
    """(depth, service, span) in tree order: parents before their CHILD_OF children, by start time."""
    spans = spans_of(trace)
    ids = {s["spanID"] for _, s in spans}
    children: dict[str | None, list[tuple[str, dict[str, Any]]]] = {}
    for service, span in spans:
        parent = next((r["spanID"] for r in span.get("references") or []
                       if r.get("refType") == "CHILD_OF" and r["spanID"] in ids), None)
        children.setdefault(parent, []).append((service, span))
    for siblings in children.values():
        siblings.sort(key=lambda item: item[1]["startTime"])
    ordered: list[tuple[int, str, dict[str, Any]]] = []

    def walk(parent: str | None, depth: int) -> None:
        for service, span in children.get(parent, []):
            ordered.append((depth, service, span))
            walk(span["spanID"], depth + 1)

    walk(None, 0)
    return ordered


def summary_line(trace: dict[str, Any]) -> str:
    """`<N> spans (a from cri-tools, b from pycrio), <root> <ms> ms`."""
    rows = span_tree(trace)
    counts: dict[str, int] = {}
    for _, service, _ in rows:
        counts[service] = counts.get(service, 0) + 1
    services = ", ".join(f"{n} from {service}" for service, n in sorted(counts.items()))
    root = rows[0][2] if rows else {"operationName": "?", "duration": 0}
    return f"{len(rows)} spans ({services}), {root['operationName']} {root['duration'] / 1000:.1f} ms"


def print_tree(trace: dict[str, Any]) -> None:
    """Print the trace id and an indented span tree with durations, pycrio's ids and log events."""
    rows = span_tree(trace)
    say(f"trace {trace['traceID']}: {summary_line(trace)}")
    labels = [f"{'  ' * depth}{service}: {span['operationName']}" for depth, service, span in rows]
    width = max(map(len, labels), default=0)
    for label, (_, service, span) in zip(labels, rows):
        line = f"  {label:<{width}}  {span['duration'] / 1000:9.3f} ms"
        if service == PYCRIO_SERVICE and tag(span, "id") is not None:
            line += f"  id={tag(span, 'id')}  log events={log_events(span)}"
        say(line)


def where_time_goes(trace: dict[str, Any]) -> list[str]:
    """For each pycrio CRI call of the trace that has steps, its longest one: `RunPodSandbox 41 ms: cni_add 33 ms (80%)`."""
    rows = span_tree(trace)
    lines = []
    for index, (depth, service, span) in enumerate(rows):
        if service != PYCRIO_SERVICE or not span["operationName"].startswith("/runtime.v1."):
            continue
        steps = []
        for later_depth, later_service, step in rows[index + 1:]:
            if later_depth <= depth:
                break
            if later_depth == depth + 1 and later_service == PYCRIO_SERVICE:
                steps.append(step)
        if not steps or not span["duration"]:
            continue
        method = span["operationName"].rsplit("/", 1)[-1]
        top = max(steps, key=lambda s: s["duration"])
        lines.append(f"{method} {span['duration'] / 1000:.1f} ms: {top['operationName']} "
                     f"{top['duration'] / 1000:.1f} ms ({100 * top['duration'] / span['duration']:.0f}%)")
    return lines


# ---------------------------------------------------------------- the demo


class Demo:
    """The demo's steps and the processes and directories it must clean up."""

    def __init__(self, keep_jaeger: bool, picture: Path | None) -> None:
        self.keep_jaeger = keep_jaeger
        self.picture = picture
        self.jaeger: Proc | None = None
        self.reused_jaeger = False
        self.pycrio: Proc | None = None
        self.registry: TestRegistry | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="pycrio-demo-"))
        if len(str(self.workdir / "pycrio.sock")) > 100:  # unix socket paths are short
            shutil.rmtree(self.workdir)
            self.workdir = Path(tempfile.mkdtemp(prefix="pycrio-demo-", dir="/tmp"))
        self.jaeger_dir = Path(tempfile.mkdtemp(prefix="pycrio-demo-jaeger-"))
        self.sock = self.workdir / "pycrio.sock"

    def crictl(self, *args: str) -> str:
        return crictl_traced(self.workdir, self.sock, *args)

    def run(self) -> None:
        """All steps; raises DemoError on the first failure."""
        require("pycrio"), require("crictl")
        self.jaeger = ensure_jaeger(self.jaeger_dir)
        self.reused_jaeger = self.jaeger is None
        self.registry, image = start_registry(self.workdir)
        self.pycrio = pycrio = start_pycrio(self.workdir, self.sock, self.registry.address)
        say(f"==> starting pycrio (pid {pycrio.popen.pid}) on {self.sock}, tracing every call to {TRACING_ENDPOINT}, "
            "log level debug")
        version = wait_until(f"pycrio to answer on {self.sock}", lambda: crictl_version(self.workdir, self.sock),
                             PYCRIO_READY_TIMEOUT, pycrio)
        runtime = next((line.split(":", 1)[1].strip() for line in version.splitlines()
                        if line.startswith("RuntimeVersion")), "?")
        say(f"    pycrio {runtime} answers")
        since_us = time.time_ns() // 1000

        self.crictl("ps")
        self.crictl("pull", image)
        pod_file, container_file = pod_files(self.workdir, image)
        # `crictl run` is runp + create + start in one command, so one trace holds the whole pod start.
        container_id = self.crictl("run", str(container_file), str(pod_file))
        pod_id = json.loads(self.crictl_quiet("inspect", container_id))["info"]["sandboxID"]
        self.crictl("exec", "-s", container_id, "sh", "-c", "echo hello from pid $$ in the demo pod")
        self.crictl("stopp", pod_id)
        self.crictl("rmp", pod_id)

        say("==> pycrio status (export health, once the batch processor has sent the spans)")
        wait_until("pycrio to report exported spans", lambda: spans_exported(self.sock), TRACE_TIMEOUT, pycrio)
        for line in pycrio_status(self.sock).rstrip("\n").splitlines():
            say(f"    {line}")
        self.stop_pycrio()

        say(f"==> reading the traces back from Jaeger ({QUERY_URL}/api/traces)")
        traces: dict[str, dict[str, Any]] = {}
        for command in DEMO_COMMANDS:
            found = wait_until(f"the trace of `crictl {command}` with pycrio's spans in Jaeger",
                               lambda c=command: find_command_trace(c, since_us), TRACE_TIMEOUT,
                               self.jaeger, pycrio.log)
            traces[command] = settled(found)
        self.show(traces)

    def crictl_quiet(self, *args: str) -> str:
        """An untraced crictl call whose output the demo reads (not printed)."""
        argv = crictl_base(self.workdir, self.sock) + list(args)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=child_env())
        if done.returncode != 0:
            raise DemoError(f"crictl {args[0]} failed: {done.stderr.strip()}")
        return done.stdout

    def show(self, traces: dict[str, dict[str, Any]]) -> None:
        """The collector's printout of ListContainers, the span trees, the links and the screenshot."""
        ps, pod_start = traces["ps"], traces["run"]
        say()
        if self.jaeger is not None:
            block = wait_until("the debug exporter's printout of the ListContainers span",
                               lambda: debug_span_block(self.jaeger.log.read_text(errors="replace"),
                                                        ps["traceID"], LIST_CONTAINERS),
                               TRACE_TIMEOUT, self.jaeger)
            say(f"==> the collector's debug exporter printed the ListContainers span of `crictl ps` (from {self.jaeger.log}):")
            for line in block.splitlines():
                say(f"    {line}")
            say()
        say("==> `crictl ps`, one trace from crictl through pycrio:")
        print_tree(ps)
        say()
        say("==> the pod start, `crictl run` (RunPodSandbox + CreateContainer + StartContainer):")
        print_tree(pod_start)
        say("    where the time goes: " + "; ".join(where_time_goes(pod_start)))
        say()
        say("==> the other commands:")
        for command in DEMO_COMMANDS:
            if command not in ("ps", "run"):
                say(f"  crictl {command:<6} trace {traces[command]['traceID']}: {summary_line(traces[command])}")
        say()
        say("open them in the Jaeger UI:")
        say(f"  pod start (crictl run):  {UI_URL}/trace/{pod_start['traceID']}")
        say(f"  crictl ps:               {UI_URL}/trace/{ps['traceID']}")
        say(f"  all of pycrio's traces:  {UI_URL}/search?service={PYCRIO_SERVICE}")
        if ui_is_placeholder():
            say("note: this Jaeger serves a placeholder page instead of the UI; run it with contrib/jaeger.yaml "
                "after `make jaeger` (it fetches the UI assets)")
        self.take_picture(pod_start)

    def take_picture(self, trace: dict[str, Any]) -> None:
        """Screenshot of the pod-start trace's timeline page, saved to build/demo/trace.png (and the README's copy)."""
        if find_chromium() is None:
            say("no Chromium found, so no screenshot: `make browser` (apt-get install chromium) and run "
                "`make demo` again to get build/demo/trace.png")
            return
        height = min(SCREENSHOT_MAX_HEIGHT, SCREENSHOT_BASE_HEIGHT + SCREENSHOT_ROW_HEIGHT * len(trace["spans"]))
        url = f"{QUERY_URL}/trace/{trace['traceID']}"
        DEMO_PICTURE.parent.mkdir(parents=True, exist_ok=True)
        DEMO_PICTURE.unlink(missing_ok=True)
        try:
            chromium(url, f"--screenshot={DEMO_PICTURE}", width=SCREENSHOT_WIDTH, height=height)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            raise DemoError(f"no screenshot: {exc}") from None
        if not DEMO_PICTURE.is_file():
            raise DemoError(f"no screenshot: chromium wrote no {DEMO_PICTURE}")
        say(f"==> screenshot of {url} (headless Chromium): {DEMO_PICTURE}")
        if self.picture is not None:
            self.picture.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(DEMO_PICTURE, self.picture)
            say(f"    and copied to {self.picture} (the README's picture)")

    def stop_pycrio(self) -> None:
        """SIGTERM pycrio, which flushes its spans to Jaeger before it exits."""
        if self.pycrio is None or self.pycrio.popen.poll() is not None:
            return
        say("==> stopping pycrio with SIGTERM (flushes its spans)")
        code = stop(self.pycrio, PYCRIO_STOP_TIMEOUT)
        if code != 0:
            say(f"warning: pycrio exited with code {code}; last lines of its log:\n{tail(self.pycrio.log)}")

    def cleanup(self) -> None:
        """Stop what the demo started (Jaeger unless kept) and remove its temporary files."""
        if self.pycrio is not None and self.pycrio.popen.poll() is None:
            # A failed step may have left the demo pod: remove it (unmounts, CNI, cgroups) first.
            subprocess.run(crictl_base(self.workdir, self.sock) + ["rmp", "-a", "-f"],
                           capture_output=True, timeout=120, env=child_env())
            stop(self.pycrio, PYCRIO_STOP_TIMEOUT)
        if self.registry is not None:
            self.registry.stop()
        remove_cgroup(POD_CGROUP_PARENT)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.jaeger is None:
            if self.reused_jaeger:
                say("Jaeger was already running before the demo; left it running")
            shutil.rmtree(self.jaeger_dir, ignore_errors=True)
        elif self.keep_jaeger and self.jaeger.popen.poll() is None:
            pid = self.jaeger.popen.pid
            say(f"Jaeger keeps running (--keep-jaeger): UI {UI_URL}, pid {pid}, log {self.jaeger.log}; "
                f"stop it with `kill {pid}`")
        else:
            stop(self.jaeger, 10.0)
            shutil.rmtree(self.jaeger_dir, ignore_errors=True)
            say(f"stopped Jaeger; {KEEP_HINT}")


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit so the demo's cleanup runs."""
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-jaeger", action="store_true",
                        help="leave the Jaeger this demo started running, so the printed links can be opened")
    parser.add_argument("--no-readme-picture", action="store_true",
                        help=f"save the screenshot only to {DEMO_PICTURE.relative_to(ROOT)}, "
                             f"not also to {README_PICTURE.relative_to(ROOT)}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    demo = Demo(args.keep_jaeger, None if args.no_readme_picture else README_PICTURE)
    started = time.monotonic()
    try:
        demo.run()
        return 0
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr, flush=True)
        if exc.log is not None:
            print(f"--- last lines of {exc.log.name} ---\n{tail(exc.log)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        demo.cleanup()
        say(f"demo took {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
