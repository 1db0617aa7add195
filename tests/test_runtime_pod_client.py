"""The "pod" runtime's client side (oci/runtime_pod.py) against a small fake pycrio-monitor.

The fake (this module run as a script) speaks the real wire format (framing + monitor_pb2), takes
the real monitor's flags and daemonizes as the contract says, but runs no containers: its
"containers" are records that start, exit on a signal and answer exec requests with canned output.
So the daemon side (spawn, calls, errors, trace context, WatchExits, death of the monitor,
streams, shutdown) is tested as the daemon runs it, before the real monitor exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

import pycrio.tracing

from pycrio.config import Config, TracingConfig
from pycrio.errors import CRIError, FailedPrecondition, NotFound
from pycrio.monitor import framing, monitor_pb2
from pycrio.oci import runtime_pod
from pycrio.oci.runtime import STATE_CREATED, STATE_RUNNING, STATE_STOPPED, SandboxHandle
from pycrio.oci.runtime_pod import MonitorClient, PodRuntime
from pycrio.streaming.session import SessionIO, TerminalSize

REPO = Path(__file__).resolve().parent.parent
RUNC = "/usr/sbin/runc"


# --- the fake monitor (a process of its own) -----------------------------------------------------


class FakeMonitor:
    """Serves one pod's fake containers on a unix socket; logs each request to requests.jsonl."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state_dir = Path(args.state_dir)
        self.containers: dict[str, monitor_pb2.ContainerState] = {}
        self.watchers: list[asyncio.StreamWriter] = []
        self.unreported: list[str] = []
        self.stop = asyncio.Event()
        self.connections = 0

    def record(self, request: monitor_pb2.Request, **extra: Any) -> None:
        entry = {"op": request.WhichOneof("op"), "uuid": request.uuid, "trace": dict(request.trace), **extra}
        with (self.state_dir / "requests.jsonl").open("a") as out:
            out.write(json.dumps(entry) + "\n")

    async def serve(self, sock: socket.socket) -> None:
        server = await asyncio.start_unix_server(self.connection, sock=sock)
        async with server:
            await self.stop.wait()

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        (self.state_dir / "connections").write_text(str(self.connections))
        try:
            while request := await framing.read_async(reader, monitor_pb2.Request):
                op = request.WhichOneof("op")
                self.record(request)
                if op in ("watch_exits", "serve_exec", "serve_attach"):
                    await getattr(self, op)(request, reader, writer)
                    return
                response = await self.handle(op, getattr(request, op))
                await framing.write_async(writer, response)
                if op == "shutdown":
                    self.stop.set()
                    return
                if op == "version" and self.args.close_after_version:
                    return  # an idle connection the monitor drops: the client must retry
        except (ConnectionError, framing.FrameError):
            pass
        finally:
            writer.close()

    async def handle(self, op: str, body: Any) -> monitor_pb2.Response:
        cid = getattr(body, "container_id", "")
        if op == "version":
            return monitor_pb2.Response(version=monitor_pb2.VersionResponse(version="fake", pid=os.getpid(), pod_id=self.args.pod_id))
        if op == "configure_tracing":
            (self.state_dir / "tracing.json").write_text(json.dumps({"enabled": body.tracing.enabled, "endpoint": body.tracing.endpoint, "rate": body.tracing.sampling_rate_per_million}))
            return monitor_pb2.Response(configure_tracing=monitor_pb2.Empty())
        if op == "shutdown":
            return monitor_pb2.Response(shutdown=monitor_pb2.Empty())
        if op == "create_container":
            if cid in self.containers:
                return monitor_pb2.Response(code=grpc.StatusCode.ALREADY_EXISTS.value[0], error=f"container {cid} exists")
            if "bad" in cid:
                return monitor_pb2.Response(code=grpc.StatusCode.UNKNOWN.value[0], error=f"runc create {cid}: exec format error")
            self.containers[cid] = monitor_pb2.ContainerState(container_id=cid, state="created", pid=4242, pid_start_time=7)
            return monitor_pb2.Response(create_container=monitor_pb2.CreateContainerResponse(pid=4242))
        if op == "container_state" and cid == "hang":
            await asyncio.sleep(30)
        state = self.containers.get(cid)
        if state is None:
            return monitor_pb2.Response(code=grpc.StatusCode.NOT_FOUND.value[0], error=f"container {cid} not found by pycrio-monitor")
        if op == "start_container":
            if state.state != "created":
                return monitor_pb2.Response(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], error=f"container {cid} is {state.state}")
            state.state, state.started_at = "running", time.time_ns()
            return monitor_pb2.Response(start_container=state)
        if op == "kill_container":
            if state.state != "stopped":
                self.exit(state, 128 + body.signal)
            return monitor_pb2.Response(kill_container=monitor_pb2.Empty())
        if op == "container_state":
            return monitor_pb2.Response(container_state=state)
        if op == "delete_container":
            del self.containers[cid]
            return monitor_pb2.Response(delete_container=monitor_pb2.Empty())
        if op == "reopen_log":
            return monitor_pb2.Response(reopen_log=monitor_pb2.Empty())
        if op == "exec_sync":
            return monitor_pb2.Response(exec_sync=await self.exec_sync(body))
        return monitor_pb2.Response(code=grpc.StatusCode.UNIMPLEMENTED.value[0], error=f"{op} is not faked")

    def exit(self, state: monitor_pb2.ContainerState, code: int) -> None:
        state.state, state.exited, state.exit_code, state.finished_at = "stopped", True, code, time.time_ns()
        exits = self.state_dir / "exits"
        exits.mkdir(exist_ok=True)
        record = {"exit_code": code, "finished_at": state.finished_at, "oom_killed": False, "started_at": state.started_at}
        (exits / f"{state.container_id}.json").write_text(json.dumps(record))
        frame = monitor_pb2.StreamFrame(exit=state)
        if not self.watchers:
            self.unreported.append(state.container_id)
        for writer in list(self.watchers):
            writer.write(framing.encode(frame))

    async def exec_sync(self, body: monitor_pb2.ExecSyncRequest) -> monitor_pb2.ExecSyncResponse:
        cmd = list(body.cmd)
        if cmd[0] == "sleep":
            if body.timeout and body.timeout < float(cmd[1]):
                await asyncio.sleep(body.timeout)
                return monitor_pb2.ExecSyncResponse(exit_code=-1, timed_out=True)
            await asyncio.sleep(float(cmd[1]))
            return monitor_pb2.ExecSyncResponse()
        if cmd[0] == "echo":
            out = " ".join(cmd[1:]).encode() + b"\n"
            return monitor_pb2.ExecSyncResponse(stdout=out[: body.output_limit], stdout_truncated=len(out) > body.output_limit)
        if cmd[0] == "exit":
            return monitor_pb2.ExecSyncResponse(exit_code=int(cmd[1]), stderr=b"bye\n")
        return monitor_pb2.ExecSyncResponse(exit_code=127, stderr=f"{cmd[0]}: not found\n".encode())

    async def watch_exits(self, request: monitor_pb2.Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await framing.write_async(writer, monitor_pb2.Response(watch_exits=monitor_pb2.Empty()))
        for cid in self.unreported:
            writer.write(framing.encode(monitor_pb2.StreamFrame(exit=self.containers[cid])))
        self.unreported.clear()
        self.watchers.append(writer)
        try:
            await reader.read()  # until the daemon goes
        finally:
            self.watchers.remove(writer)

    async def serve_exec(self, request: monitor_pb2.Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = request.serve_exec
        if body.container_id not in self.containers:
            await framing.write_async(writer, monitor_pb2.Response(code=grpc.StatusCode.NOT_FOUND.value[0], error=f"container {body.container_id} not found"))
            return
        await framing.write_async(writer, monitor_pb2.Response(serve_exec=monitor_pb2.Empty()))
        cmd = list(body.cmd)
        if cmd[0] == "fail":
            await framing.write_async(writer, monitor_pb2.StreamFrame(error="exec failed: no such file"))
            return
        if cmd[0] == "vanish":  # the stream ends without an exit code (a monitor going away)
            return
        if cmd[0] == "out":  # stdout and stderr, then the exit code
            await framing.write_async(writer, monitor_pb2.StreamFrame(stdout=b"to-out\n"))
            await framing.write_async(writer, monitor_pb2.StreamFrame(stderr=b"to-err\n"))
            await framing.write_async(writer, monitor_pb2.StreamFrame(exit_code=int(cmd[1])))
            return
        # "cat": stdin back as stdout, resizes as text, exit 0 at stdin EOF
        while True:
            frame = await framing.read_async(reader, monitor_pb2.StreamFrame)
            if frame is None:
                (self.state_dir / "exec-killed").write_text("client gone")
                return
            kind = frame.WhichOneof("frame")
            if kind == "stdin":
                await framing.write_async(writer, monitor_pb2.StreamFrame(stdout=frame.stdin))
            elif kind == "resize":
                await framing.write_async(writer, monitor_pb2.StreamFrame(stdout=f"[{frame.resize.width}x{frame.resize.height}]".encode()))
            elif kind == "stdin_eof":
                await framing.write_async(writer, monitor_pb2.StreamFrame(exit_code=0))
                return

    async def serve_attach(self, request: monitor_pb2.Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await framing.write_async(writer, monitor_pb2.Response(serve_attach=monitor_pb2.Empty()))
        await framing.write_async(writer, monitor_pb2.StreamFrame(stdout=b"attached\n"))
        while frame := await framing.read_async(reader, monitor_pb2.StreamFrame):
            if frame.WhichOneof("frame") == "stdin_eof":
                break
            if frame.WhichOneof("frame") == "stdin":
                await framing.write_async(writer, monitor_pb2.StreamFrame(stderr=frame.stdin.upper()))
        # an attach ends when the container's output does: the monitor closes the stream


def fake_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    for flag in ("--pod-id", "--socket", "--state-dir", "--runtime-path", "--runtime-root", "--cgroup", "--log-level",
                 "--log-file", "--tracing-endpoint", "--tracing-sampling-rate-per-million"):
        parser.add_argument(flag)
    parser.add_argument("--enable-tracing", action="store_true")
    parser.add_argument("--foreground", action="store_true")
    parser.add_argument("--zygote-socket")
    args = parser.parse_args(argv)
    args.close_after_version = os.environ.get("FAKE_MONITOR_CLOSE_AFTER_VERSION") == "1"
    state_dir = Path(args.state_dir)
    (state_dir / "argv.json").write_text(json.dumps(argv))
    mode = os.environ.get("FAKE_MONITOR_MODE", "")
    if mode == "fail":
        print("pycrio-monitor: cannot join cgroup /nowhere: Permission denied", file=sys.stderr)
        return 1
    if mode == "hang":
        time.sleep(3600)
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        message = os.read(read_end, 4096)
        if message != b"ok":
            sys.stderr.write(message.decode())
            return 1
        return 0
    os.close(read_end)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dir_fd = os.open(Path(args.socket).parent, os.O_PATH)
        sock.bind(f"/proc/self/fd/{dir_fd}/{Path(args.socket).name}")  # long paths too
        os.close(dir_fd)
        sock.listen(64)
        (state_dir / "monitor.pid").write_text(str(os.getpid()))
    except OSError as exc:
        os.write(write_end, str(exc).encode())
        os._exit(1)
    os.write(write_end, b"ok")
    os.close(write_end)
    asyncio.run(FakeMonitor(args).serve(sock))
    os._exit(0)


# --- fixtures ----------------------------------------------------------------------------------


class Exits:
    """What the runtime reports through its exit callback."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.event = threading.Condition()

    def __call__(self, container_id: str) -> None:
        with self.event:
            self.ids.append(container_id)
            self.event.notify_all()

    def wait_for(self, container_id: str, count: int = 1, timeout: float = 10.0) -> bool:
        with self.event:
            return self.event.wait_for(lambda: self.ids.count(container_id) >= count, timeout)


class Pods:
    """A PodRuntime whose monitor binary is the fake; pods under tmp (long paths on purpose)."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        wrapper = tmp / "fake-pycrio-monitor"
        wrapper.write_text(f"#!/bin/sh\ncd {REPO}\nexec {sys.executable} -m tests.test_runtime_pod_client \"$@\"\n")
        wrapper.chmod(0o755)
        self.pods_dir = tmp / ("p" * 40) / "pods"
        config = Config()
        config.runroot = str(tmp / "run")
        config.runtime.pod_cgroup_parent = "/pycrio-fake"
        self.runtime = PodRuntime("podrt", RUNC, tmp / "runc", pods_dir=self.pods_dir, config=config, monitor_path=str(wrapper))
        self.exits = Exits()
        self.runtime.report_exits(self.exits)
        self.sandboxes: list[SandboxHandle] = []
        self.env = env or {}

    def sandbox(self, name: str = "a") -> SandboxHandle:
        pod_id = (name * 64)[:64]
        directory = self.pods_dir / pod_id
        directory.mkdir(parents=True, exist_ok=True)
        handle = SandboxHandle(id=pod_id, directory=directory, cgroup_parent="")
        old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            self.runtime.create_sandbox(handle)
            self.runtime.wait_sandbox(handle)  # as RunPodSandbox does, before the environment is put back
        finally:
            for key, value in old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.sandboxes.append(handle)
        return handle

    def handle(self, pod: SandboxHandle, cid: str) -> Any:
        bundle = self.tmp / "bundles" / cid
        bundle.mkdir(parents=True, exist_ok=True)
        return self.runtime.for_sandbox(pod.id).container_handle(cid, bundle, self.tmp / "logs" / f"{cid}.log", pod_id=pod.id)

    def requests(self, pod: SandboxHandle) -> list[dict[str, Any]]:
        path = pod.directory / "monitor" / "requests.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def monitor_pid(self, pod: SandboxHandle) -> int:
        return int((pod.directory / "monitor" / "monitor.pid").read_text())

    def close(self) -> None:
        for sandbox in self.sandboxes:
            self.runtime.remove_sandbox(sandbox)
        self.runtime.report_exits(None)


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[Pods]:
    p = Pods(tmp_path)
    yield p
    p.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# --- spawning ----------------------------------------------------------------------------------


def test_create_sandbox_runs_the_monitor_with_the_contract_flags_and_a_long_socket_path(pods: Pods) -> None:
    pods.runtime.config.tracing = TracingConfig(enable_tracing=True, tracing_endpoint="127.0.0.1:4999", tracing_sampling_rate_per_million=12)
    pod = pods.sandbox()
    monitor_dir = pod.directory / "monitor"
    socket_path = monitor_dir / "monitor.sock"
    assert len(str(socket_path)) > 108  # only reachable through the directory's fd
    argv = json.loads((monitor_dir / "argv.json").read_text())
    flags = dict(zip(argv[::2], argv[1::2]))
    assert flags["--pod-id"] == pod.id
    assert flags["--socket"] == str(socket_path)
    assert flags["--state-dir"] == str(monitor_dir)
    assert flags["--runtime-path"] == RUNC
    assert flags["--runtime-root"] == str(pods.tmp / "runc")
    assert flags["--log-file"] == str(monitor_dir / "monitor.log")
    assert flags["--log-level"] == "info"
    assert "--zygote-socket" not in flags  # another monitor binary is run, not forked by our zygote
    assert "--enable-tracing" in argv
    assert argv[argv.index("--tracing-endpoint") + 1] == "127.0.0.1:4999"
    assert argv[argv.index("--tracing-sampling-rate-per-million") + 1] == "12"
    assert "--cgroup" not in argv  # the sandbox has no cgroup parent
    assert _alive(pods.monitor_pid(pod))
    client = MonitorClient(socket_path, pod.id)
    version = client.call("version", monitor_pb2.VersionRequest()).version
    assert (version.pod_id, version.pid) == (pod.id, pods.monitor_pid(pod))


def test_the_monitor_cgroup_is_the_pods_unless_pycrio_removes_that_one_at_stop(pods: Pods) -> None:
    given = SandboxHandle(id="x" * 64, directory=pods.tmp, cgroup_parent="/kubepods/besteffort/poduid")
    assert pods.runtime._monitor_cgroup(given) == "/kubepods/besteffort/poduid"
    own = SandboxHandle(id="y" * 64, directory=pods.tmp, cgroup_parent=f"/pycrio-fake/{'y' * 64}")
    assert pods.runtime._monitor_cgroup(own) == f"/pycrio-fake/{'y' * 64}-monitor"


def test_a_monitor_that_fails_to_start_is_a_clear_error_with_its_stderr(tmp_path: Path) -> None:
    pods = Pods(tmp_path, env={"FAKE_MONITOR_MODE": "fail"})
    with pytest.raises(CRIError) as err:
        pods.sandbox()
    assert "start pycrio-monitor of pod" in err.value.message
    assert "cannot join cgroup /nowhere: Permission denied" in err.value.message
    assert "(exit 1)" in err.value.message


def test_a_monitor_that_never_reports_is_killed_after_the_timeout(tmp_path: Path) -> None:
    pods = Pods(tmp_path, env={"FAKE_MONITOR_MODE": "hang"})
    pods.runtime.spawn_timeout = 1.0
    started = time.monotonic()
    with pytest.raises(CRIError) as err:
        pods.sandbox()
    assert time.monotonic() - started < 10
    assert "did not report serving within 1s" in err.value.message


def test_handlers_build_a_pod_runtime_for_the_pod_type_beside_oci(tmp_path: Path) -> None:
    from pycrio.config.schema import RuntimeHandler
    from pycrio.oci.runtime_oci import OCIRuntime
    from pycrio.pods.runtimes import RuntimeHandlers

    config = Config()
    config.runroot = str(tmp_path / "run")
    config.runtime.runtimes = {
        "runc": RuntimeHandler(runtime_path="runc", runtime_type="pod"),
        "runc-oci": RuntimeHandler(runtime_path="runc"),
    }
    handlers = RuntimeHandlers(config)
    pod = handlers.get("runc")
    assert isinstance(pod, PodRuntime) and pod.runtime_root == tmp_path / "run" / "runtimes" / "runc"
    assert pod.pods_dir == tmp_path / "run" / "pods"
    assert type(handlers.get("runc-oci")) is OCIRuntime
    assert handlers.for_pod("runc", "p1") is handlers.for_pod("runc", "p1") is not pod
    report = handlers.report()
    assert report["runc"] == {"runtime_type": "pod", "available": pod.available()[0], "reason": pod.available()[1]}
    assert report["runc-oci"]["runtime_type"] == "oci"
    missing = PodRuntime("x", RUNC, tmp_path, pods_dir=tmp_path, monitor_path=str(tmp_path / "no-monitor"))
    assert missing.available() == (False, f"{tmp_path / 'no-monitor'} not found (not an executable file, nor in PATH)")


# --- calls ---------------------------------------------------------------------------------------


def test_container_lifecycle_through_the_monitor(pods: Pods) -> None:
    pod = pods.sandbox()
    runtime = pods.runtime.for_sandbox(pod.id)
    assert runtime is pods.runtime.for_sandbox(pod.id) and runtime is not pods.runtime
    c = pods.handle(pod, "c1")
    assert runtime.create(c) == 4242
    assert runtime.status(c).state == STATE_CREATED
    runtime.start(c)
    status = runtime.status(c)
    assert (status.state, status.pid, status.pid_start_time) == (STATE_RUNNING, 4242, 7)
    assert status.started_at > 0
    runtime.stop(c, 5)  # inherited: the signal goes through the monitor's KillContainer
    status = runtime.status(c)
    assert (status.state, status.exit_code) == (STATE_STOPPED, 128 + signal.SIGTERM)
    assert pods.exits.wait_for("c1")  # reported by WatchExits, not polled
    runtime.delete(c)
    with pytest.raises(NotFound):
        runtime.status(c)
    runtime.delete(c)  # twice is fine (runc has no such container either)
    ops = [r["op"] for r in pods.requests(pod)]
    assert {"create_container", "start_container", "kill_container", "container_state", "delete_container", "watch_exits"} <= set(ops)


def test_monitor_errors_become_cri_errors_with_their_codes(pods: Pods) -> None:
    pod = pods.sandbox()
    runtime = pods.runtime.for_sandbox(pod.id)
    with pytest.raises(NotFound, match="container nope not found by pycrio-monitor"):
        runtime.start(pods.handle(pod, "nope"))
    c = pods.handle(pod, "c1")
    runtime.create(c)
    runtime.start(c)
    with pytest.raises(FailedPrecondition, match="is running"):
        runtime.start(c)
    with pytest.raises(CRIError) as err:
        runtime.create(c)
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(CRIError) as err:
        runtime.create(pods.handle(pod, "bad"))
    assert (err.value.code, err.value.message) == (grpc.StatusCode.UNKNOWN, "runc create bad: exec format error")


def test_exec_sync_output_codes_limits_and_timeouts(pods: Pods) -> None:
    pod = pods.sandbox()
    runtime = pods.runtime.for_sandbox(pod.id)
    c = pods.handle(pod, "c1")
    runtime.create(c)
    runtime.start(c)
    result = runtime.exec_sync(c, ["echo", "hello", "world"], None)
    assert (result.exit_code, result.stdout, result.timed_out) == (0, b"hello world\n", False)
    result = runtime.exec_sync(c, ["echo", "hello", "world"], None, output_limit=5)
    assert (result.stdout, result.stdout_truncated) == (b"hello", True)
    result = runtime.exec_sync(c, ["exit", "3"], 10)
    assert (result.exit_code, result.stderr) == (3, b"bye\n")
    started = time.monotonic()
    result = runtime.exec_sync(c, ["sleep", "30"], 0.5)
    assert result.timed_out and time.monotonic() - started < 5


def test_a_call_past_its_timeout_is_deadline_exceeded(pods: Pods) -> None:
    pod = pods.sandbox()
    client = MonitorClient(pod.directory / "monitor" / "monitor.sock", pod.id)
    with pytest.raises(CRIError) as err:
        client.call("container_state", monitor_pb2.ContainerStateRequest(container_id="hang"), timeout=0.5)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not answer ContainerState within" in err.value.message
    assert client.call("version", monitor_pb2.VersionRequest()).version.version == "fake"  # a fresh connection


def test_concurrent_calls_share_a_small_pool_of_connections(pods: Pods) -> None:
    pod = pods.sandbox()
    client = MonitorClient(pod.directory / "monitor" / "monitor.sock", pod.id)

    def calls(_: int) -> int:
        return sum(client.call("version", monitor_pb2.VersionRequest()).version.pid > 0 for _ in range(25))

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(calls, range(8))) == 200
    connections = int((pod.directory / "monitor" / "connections").read_text())
    assert connections <= 8 + 2  # at most one per concurrent caller (+ WatchExits), not one per call


def test_an_idle_connection_the_monitor_closed_is_retried_on_a_fresh_one(tmp_path: Path) -> None:
    pods = Pods(tmp_path, env={"FAKE_MONITOR_CLOSE_AFTER_VERSION": "1"})
    try:
        pod = pods.sandbox()
        client = MonitorClient(pod.directory / "monitor" / "monitor.sock", pod.id)
        for _ in range(3):  # each answer is followed by the monitor closing that connection
            assert client.call("version", monitor_pb2.VersionRequest()).version.version == "fake"
    finally:
        pods.close()


# --- tracing -----------------------------------------------------------------------------------


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # The client spans and the runtime_* steps come from pycrio.tracing's tracer.
    monkeypatch.setattr(pycrio.tracing, "_STEP_TRACER", provider.get_tracer("pycrio"))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def test_each_call_is_a_client_span_whose_context_travels_in_the_request(pods: Pods, spans: Any) -> None:
    tracer, exporter = spans
    pod = pods.sandbox()
    runtime = pods.runtime.for_sandbox(pod.id)
    c = pods.handle(pod, "c1")
    runtime.create(c)  # no recording parent: no span, no context
    with tracer.start_as_current_span("/runtime.v1.RuntimeService/StartContainer") as parent:
        runtime.start(c)
        with pytest.raises(NotFound):
            runtime.start(pods.handle(pod, "nope"))
    finished = {(s.name, s.attributes.get("container_id")): s for s in exporter.get_finished_spans()}
    assert not any(name.endswith("CreateContainer") for name, _ in finished)
    client = finished[("pycrio-monitor-client: StartContainer", "c1")]
    assert client.kind.name == "CLIENT"
    assert client.parent is not None and client.context.trace_id == parent.get_span_context().trace_id
    assert client.attributes["container_id"] == "c1" and client.attributes["pod.id"] == pod.id
    requests = {r["op"]: r for r in pods.requests(pod) if r["op"] in ("create_container", "start_container")}
    assert requests["create_container"]["trace"] == {}
    start = [r for r in pods.requests(pod) if r["op"] == "start_container"]
    traceparent = start[0]["trace"]["traceparent"]
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (trace_id, span_id) == (f"{client.context.trace_id:032x}", f"{client.context.span_id:016x}")
    assert int(flags, 16) & 1, "sampled"
    assert start[0]["uuid"] == client.attributes["uuid"]
    failed = [s for s in exporter.get_finished_spans() if s.attributes.get("container_id") == "nope"]
    assert failed and failed[0].status.status_code.name == "ERROR"


def test_configure_tracing_reaches_every_live_monitor(pods: Pods) -> None:
    pod_a, pod_b = pods.sandbox("a"), pods.sandbox("b")
    pods.runtime.configure_tracing(TracingConfig(enable_tracing=True, tracing_endpoint="127.0.0.1:4777", tracing_sampling_rate_per_million=5))
    for pod in (pod_a, pod_b):
        path = pod.directory / "monitor" / "tracing.json"
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(path.read_text()) == {"enabled": True, "endpoint": "127.0.0.1:4777", "rate": 5}


# --- exits and the monitor's death ----------------------------------------------------------------


def test_exits_recorded_while_nobody_watched_are_replayed_when_the_daemon_comes_back(pods: Pods) -> None:
    pod = pods.sandbox()
    runtime = pods.runtime.for_sandbox(pod.id)
    c = pods.handle(pod, "c1")
    runtime.create(c)
    runtime.start(c)
    pods.runtime.report_exits(None)  # the daemon is gone...
    client = MonitorClient(pod.directory / "monitor" / "monitor.sock", pod.id)
    client.call("kill_container", monitor_pb2.KillContainerRequest(container_id="c1", signal=9))
    # ...and a new one starts: a fresh runtime attaches to the monitor from the pod's directory
    again = PodRuntime("podrt", RUNC, pods.tmp / "runc", pods_dir=pods.pods_dir, config=pods.runtime.config,
                       monitor_path=pods.runtime.monitor_path)  # fmt: skip
    exits = Exits()
    again.report_exits(exits)
    try:
        again.restore_sandbox(pod)
        assert exits.wait_for("c1")
        status = again.for_sandbox(pod.id).status(c)
        assert (status.state, status.exit_code) == (STATE_STOPPED, 137)
    finally:
        again.report_exits(None)


def test_a_killed_monitor_stops_its_containers_with_a_reason_and_the_pod_still_goes(pods: Pods) -> None:
    pod = pods.sandbox()
    runtime = pods.runtime.for_sandbox(pod.id)
    running, exited = pods.handle(pod, "running"), pods.handle(pod, "exited")
    for c in (running, exited):
        runtime.create(c)
        runtime.start(c)
    runtime.kill(exited, signal.SIGKILL)
    assert pods.exits.wait_for("exited")
    os.kill(pods.monitor_pid(pod), signal.SIGKILL)
    assert pods.exits.wait_for("running", timeout=10), "the monitor's death was not noticed"
    status = runtime.status(running)
    assert (status.state, status.exit_code) == (STATE_STOPPED, 255)
    assert status.message == f"pycrio-monitor of pod {pod.id} exited"
    assert runtime.status(exited).exit_code == 137  # what it recorded before it died
    with pytest.raises(FailedPrecondition, match="exited: cannot exec"):
        runtime.exec_sync(running, ["echo"], None)
    runtime.delete(running)  # runc has no such container: fine
    pods.runtime.remove_sandbox(pod)
    assert not (pod.directory / "monitor").exists()


def test_remove_sandbox_shuts_the_monitor_down_and_twice_is_fine(pods: Pods) -> None:
    pod = pods.sandbox()
    pid = pods.monitor_pid(pod)
    started = time.monotonic()
    pods.runtime.remove_sandbox(pod)
    assert time.monotonic() - started < runtime_pod.SHUTDOWN_WAIT  # it obeyed Shutdown, was not killed
    assert not _alive(pid)
    assert not (pod.directory / "monitor").exists()
    pods.runtime.remove_sandbox(pod)
    with pytest.raises(NotFound):
        pods.runtime.for_sandbox(pod.id).status(pods.handle(pod, "c1"))


# --- streams ---------------------------------------------------------------------------------


def _session(tty: bool = False, stdin: bool = True) -> tuple[SessionIO, list[bytes], list[bytes]]:
    out: list[bytes] = []
    err: list[bytes] = []

    async def sink_out(data: bytes) -> None:
        out.append(data)

    async def sink_err(data: bytes) -> None:
        err.append(data)

    io = SessionIO(tty=tty, stdin_enabled=stdin, stdout_enabled=True, stderr_enabled=not tty, stdout_sink=sink_out, stderr_sink=sink_err)
    return io, out, err


def test_exec_stream_pumps_stdin_resizes_and_output_and_returns_the_exit_code(pods: Pods) -> None:
    pod = pods.sandbox()
    runtime = pods.runtime.for_sandbox(pod.id)
    c = pods.handle(pod, "c1")
    runtime.create(c)
    runtime.start(c)

    async def scenario() -> None:
        io, out, err = _session()
        assert await runtime.exec_stream(c, ["out", "3"], io) == 3
        assert (b"".join(out), b"".join(err)) == (b"to-out\n", b"to-err\n")
        io, out, _ = _session(tty=True)
        io.resizes.put_nowait(TerminalSize(80, 24))
        task = asyncio.ensure_future(runtime.exec_stream(c, ["cat"], io))
        await asyncio.sleep(0.2)
        io.feed_stdin(b"hello ")
        io.feed_stdin(b"world")
        io.feed_stdin(b"")
        assert await asyncio.wait_for(task, 10) == 0
        assert b"".join(out) == b"[80x24]hello world"
        io, _, _ = _session()
        with pytest.raises(CRIError, match="exec failed: no such file"):
            await runtime.exec_stream(c, ["fail"], io)
        with pytest.raises(CRIError, match="ended the exec in container c1 without an exit code"):
            await runtime.exec_stream(c, ["vanish"], _session()[0])
        with pytest.raises(NotFound):
            await runtime.exec_stream(pods.handle(pod, "nope"), ["cat"], _session()[0])

    asyncio.run(scenario())


def test_a_client_that_leaves_closes_the_exec_connection(pods: Pods) -> None:
    from pycrio.streaming.session import ClientGone

    pod = pods.sandbox()
    runtime = pods.runtime.for_sandbox(pod.id)
    c = pods.handle(pod, "c1")
    runtime.create(c)
    runtime.start(c)

    async def scenario() -> None:
        io, _, _ = _session()
        task = asyncio.ensure_future(runtime.exec_stream(c, ["cat"], io))
        await asyncio.sleep(0.2)
        io.client_gone.set()
        with pytest.raises(ClientGone):
            await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    killed = pod.directory / "monitor" / "exec-killed"
    deadline = time.monotonic() + 10
    while not killed.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert killed.exists(), "the monitor did not see the exec's connection end"


def test_attach_stream_until_the_monitor_ends_it(pods: Pods) -> None:
    pod = pods.sandbox()
    runtime = pods.runtime.for_sandbox(pod.id)
    c = pods.handle(pod, "c1")
    runtime.create(c)
    runtime.start(c)

    async def scenario() -> None:
        io, out, err = _session()
        task = asyncio.ensure_future(runtime.attach_stream(c, io))
        await asyncio.sleep(0.2)
        io.feed_stdin(b"shout")
        await asyncio.sleep(0.2)
        io.feed_stdin(b"")
        assert await asyncio.wait_for(task, 10) is None
        assert (b"".join(out), b"".join(err)) == (b"attached\n", b"SHOUT")

    asyncio.run(scenario())


if __name__ == "__main__":
    sys.exit(fake_main(sys.argv[1:]))
