#!/usr/bin/env python3
"""End-to-end tracing demo: `crictl ps` -> pycrio -> Jaeger, then print the joined trace.

`make demo` runs this with the project's virtualenv. It starts (or reuses) a Jaeger all-in-one
with in-memory storage, runs pycrio with every call traced on a throwaway socket, runs a traced
`crictl ps` against it, stops pycrio (which flushes its spans) and reads the trace back from
Jaeger's HTTP query API: one trace holding crictl's spans (service cri-tools) and, below them,
pycrio's (pycrio continues crictl's W3C trace context). Standard library only.

    make demo                              # Jaeger is stopped at the end
    make demo DEMO_ARGS=--keep-jaeger      # Jaeger stays up so the printed link can be opened
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

OTLP_GRPC = ("127.0.0.1", 4317)
QUERY_PORT = 16686
QUERY_URL = f"http://127.0.0.1:{QUERY_PORT}"
UI_URL = f"http://localhost:{QUERY_PORT}"
TRACING_ENDPOINT = f"{OTLP_GRPC[0]}:{OTLP_GRPC[1]}"

CRICTL_SERVICE = "cri-tools"
PYCRIO_SERVICE = "pycrio"
LIST_CONTAINERS = "/runtime.v1.RuntimeService/ListContainers"

JAEGER_READY_TIMEOUT = 30.0
PYCRIO_READY_TIMEOUT = 20.0
PYCRIO_STOP_TIMEOUT = 20.0
TRACE_TIMEOUT = 30.0
# Without --config the jaeger (v2) binary runs its built-in all-in-one configuration: memory
# storage, OTLP on 127.0.0.1:4317 (gRPC) and 127.0.0.1:4318 (HTTP), query API/UI on :16686 (plus
# Jaeger/Zipkin receivers, health, metrics and sampling ports). --set still applies on top of it:
# the query service traces itself by default and, on SIGTERM, spends 10 s failing to export those
# spans to its own, already closed, OTLP receiver; turning that off makes it stop at once.
JAEGER_ARGS = ["--set=extensions.jaeger_query.enable_tracing=false"]
KEEP_HINT = "run `make demo DEMO_ARGS=--keep-jaeger` to keep the UI up"
# What Jaeger serves on / when its binary was built without the UI (plain `go install`).
UI_PLACEHOLDER_MARK = "This is not the Jaeger UI you are looking for"

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


def start(name: str, argv: list[str], log: Path) -> Proc:
    """Start a background process in its own session (Ctrl-C reaches only the demo, which cleans up)."""
    with log.open("wb") as out:
        try:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=child_env(), start_new_session=True,
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
    """Reuse a running Jaeger or start `.venv/bin/jaeger` (all-in-one, in-memory); None if reused."""
    state = query_port_state()
    if state == "jaeger":
        if not port_open(OTLP_GRPC[1]):
            raise DemoError(f"a Jaeger answers on :{QUERY_PORT} but nothing accepts OTLP/gRPC on {TRACING_ENDPOINT}")
        say(f"==> reusing the Jaeger already answering on {UI_URL}")
        return None
    if state == "other":
        raise DemoError(f"port {QUERY_PORT} is taken by something that is not Jaeger (GET /api/services failed); stop it first")
    if port_open(OTLP_GRPC[1]):
        raise DemoError(f"port {OTLP_GRPC[1]} (OTLP/gRPC) is taken by another process (a Collector?) while no Jaeger "
                        f"answers on :{QUERY_PORT}; stop it first")
    jaeger = start("jaeger", [require("jaeger"), *JAEGER_ARGS], logdir / "jaeger.log")
    say(f"==> starting Jaeger (pid {jaeger.popen.pid}, log {jaeger.log})")
    wait_until(f"Jaeger's query API on :{QUERY_PORT} and OTLP/gRPC on {TRACING_ENDPOINT}",
               jaeger_ready, JAEGER_READY_TIMEOUT, jaeger)
    return jaeger


def ui_is_placeholder() -> bool:
    """Whether this Jaeger was built without its web UI (it then serves a placeholder page)."""
    try:
        return UI_PLACEHOLDER_MARK in get_text("/")
    except OSError:
        return False


# ---------------------------------------------------------------- pycrio and crictl


def crictl_base(workdir: Path, sock: Path) -> list[str]:
    """crictl with its own (empty-ish) config file so /etc/crictl.yaml does not interfere."""
    config = workdir / "crictl.yaml"
    if not config.exists():
        config.write_text(f"runtime-endpoint: unix://{sock}\nimage-endpoint: unix://{sock}\ntimeout: 2\n")
    return [require("crictl"), "--config", str(config),
            "--runtime-endpoint", f"unix://{sock}", "--image-endpoint", f"unix://{sock}"]


def start_pycrio(workdir: Path, sock: Path) -> Proc:
    """pycrio with every call traced, all its paths inside `workdir`, at debug so calls carry log events."""
    config = workdir / "pycrio.conf"
    config.touch()
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


def crictl_ps(workdir: Path, sock: Path) -> str:
    """Run a traced `crictl ps` (spans to Jaeger, W3C context to pycrio) and return its output."""
    argv = crictl_base(workdir, sock) + ["--enable-tracing", "--tracing-endpoint", TRACING_ENDPOINT, "ps"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=child_env())
    except subprocess.TimeoutExpired:
        raise DemoError("crictl ps did not finish within 60s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DemoError(f"crictl ps failed with code {done.returncode}: {last}")
    return done.stdout


# ---------------------------------------------------------------- the trace


def spans_of(trace: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(service name, span) for every span of a Jaeger JSON trace."""
    services = {pid: p["serviceName"] for pid, p in trace.get("processes", {}).items()}
    return [(services.get(s["processID"], "?"), s) for s in trace.get("spans", [])]


def fetch_traces() -> dict[str, dict[str, Any]]:
    """Recent traces of pycrio and of crictl from Jaeger, by trace id (the fuller copy wins)."""
    traces: dict[str, dict[str, Any]] = {}
    for service in (PYCRIO_SERVICE, CRICTL_SERVICE):
        query = urllib.parse.urlencode({"service": service, "limit": 20, "lookback": "1h"})
        for trace in get_json(f"/api/traces?{query}").get("data") or []:
            known = traces.get(trace["traceID"])
            if known is None or len(trace["spans"]) > len(known["spans"]):
                traces[trace["traceID"]] = trace
    return traces


def list_containers_start(trace: dict[str, Any], since_us: int) -> int | None:
    """Start time of this run's pycrio ListContainers span if the trace also has crictl's spans."""
    services = {service for service, _ in spans_of(trace)}
    if CRICTL_SERVICE not in services:
        return None
    starts = [s["startTime"] for service, s in spans_of(trace)
              if service == PYCRIO_SERVICE and s["operationName"] == LIST_CONTAINERS and s["startTime"] >= since_us]
    return max(starts, default=None)


def find_trace(since_us: int) -> dict[str, Any] | None:
    """The newest trace joining crictl's and pycrio's spans of this run's `crictl ps`, if stored yet."""
    best: tuple[int, dict[str, Any]] | None = None
    for trace in fetch_traces().values():
        started = list_containers_start(trace, since_us)
        if started is not None and (best is None or started > best[0]):
            best = (started, trace)
    return best[1] if best else None


def reread(trace: dict[str, Any]) -> dict[str, Any]:
    """The same trace read again by id half a second later, so any straggling span is in it."""
    time.sleep(0.5)
    try:
        return (get_json(f"/api/traces/{trace['traceID']}").get("data") or [trace])[0]
    except (OSError, ValueError):
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


def print_trace(trace: dict[str, Any]) -> None:
    """Print the trace id and an indented span tree with durations, pycrio's ids and log events."""
    rows = span_tree(trace)
    counts: dict[str, int] = {}
    for _, service, _ in rows:
        counts[service] = counts.get(service, 0) + 1
    summary = ", ".join(f"{n} from {service}" for service, n in sorted(counts.items()))
    say(f"trace {trace['traceID']}: {len(rows)} spans ({summary})")
    labels = [f"{'  ' * depth}{service}: {span['operationName']}" for depth, service, span in rows]
    width = max(map(len, labels), default=0)
    for label, (_, service, span) in zip(labels, rows):
        line = f"  {label:<{width}}  {span['duration'] / 1000:9.3f} ms"
        if service == PYCRIO_SERVICE:
            line += f"  id={tag(span, 'id')}  log events={log_events(span)}"
        say(line)


# ---------------------------------------------------------------- the demo


class Demo:
    """The demo's steps and the processes and directories it must clean up."""

    def __init__(self, keep_jaeger: bool) -> None:
        self.keep_jaeger = keep_jaeger
        self.jaeger: Proc | None = None
        self.reused_jaeger = False
        self.pycrio: Proc | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="pycrio-demo-"))
        if len(str(self.workdir / "pycrio.sock")) > 100:  # unix socket paths are short
            shutil.rmtree(self.workdir)
            self.workdir = Path(tempfile.mkdtemp(prefix="pycrio-demo-", dir="/tmp"))
        self.jaeger_dir = Path(tempfile.mkdtemp(prefix="pycrio-demo-jaeger-"))
        self.sock = self.workdir / "pycrio.sock"

    def run(self) -> None:
        """All steps; raises DemoError on the first failure."""
        require("pycrio"), require("crictl")
        self.jaeger = ensure_jaeger(self.jaeger_dir)
        self.reused_jaeger = self.jaeger is None
        self.pycrio = pycrio = start_pycrio(self.workdir, self.sock)
        say(f"==> starting pycrio (pid {pycrio.popen.pid}) on {self.sock}, tracing every call to {TRACING_ENDPOINT}")
        version = wait_until(f"pycrio to answer on {self.sock}", lambda: crictl_version(self.workdir, self.sock),
                             PYCRIO_READY_TIMEOUT, pycrio)
        runtime = next((line.split(":", 1)[1].strip() for line in version.splitlines()
                        if line.startswith("RuntimeVersion")), "?")
        say(f"    pycrio {runtime} answers")
        since_us = time.time_ns() // 1000
        say(f"==> crictl --enable-tracing --tracing-endpoint {TRACING_ENDPOINT} ps")
        say(crictl_ps(self.workdir, self.sock).rstrip("\n"))
        say("==> pycrio status (export health, once the batch processor has sent the spans)")
        wait_until("pycrio to report exported spans", lambda: spans_exported(self.sock), TRACE_TIMEOUT, pycrio)
        say(pycrio_status(self.sock).rstrip("\n"))
        self.stop_pycrio()
        say(f"==> waiting for the trace of `crictl ps` in Jaeger ({QUERY_URL}/api/traces)")
        found = wait_until(f"a trace with crictl's spans and pycrio's {LIST_CONTAINERS} span in Jaeger",
                           lambda: find_trace(since_us), TRACE_TIMEOUT, self.jaeger, pycrio.log)
        trace = reread(found)
        say()
        print_trace(trace)
        say()
        say(f"open it in Jaeger: {UI_URL}/trace/{trace['traceID']}")
        if ui_is_placeholder():
            say("note: this jaeger binary was built without the web UI assets (plain `go install`), so the link "
                f"shows a placeholder page; the trace as JSON: {UI_URL}/api/traces/{trace['traceID']}")

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
            stop(self.pycrio, PYCRIO_STOP_TIMEOUT)
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
                        help="leave the Jaeger this demo started running, so the printed trace link can be opened")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    demo = Demo(args.keep_jaeger)
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


if __name__ == "__main__":
    sys.exit(main())
