"""The "pod" runtime: one pycrio-monitor per pod owns the pod's containers (our conmon-rs).

The monitor is started at RunPodSandbox (`create_sandbox`), detached and in the pod's cgroup, and
serves `proto/monitor.proto` on `<pod dir>/monitor/monitor.sock`. This module is its client:

- Container calls (create, start, kill, delete, state, exec sync, reopen log) are one Request
  and one Response each, on pooled blocking connections, under a CLIENT span
  `pycrio-monitor-client: <Method>` whose W3C context travels in `Request.trace`; a Response's
  code becomes a CRIError here, once.
- One daemon thread per monitor reads its WatchExits stream and reports each exit. When that
  stream ends without a Shutdown and the monitor's process is gone, the monitor died: its
  containers are reported stopped (exit code 255, or the one the monitor recorded on disk) and
  what is left of them is deleted with runc directly.
- Exec and attach streams are asyncio connections (ServeExec, ServeAttach) whose StreamFrames are
  pumped to and from the session's SessionIO; closing the connection makes the monitor kill an exec.
- Stop (signal, wait, SIGKILL), update_resources (runc update on the same runc root) and
  dial_port (the daemon enters the pod's netns itself) are the "oci" runtime's.

Monitors outlive the daemon: after a restart, `restore_sandbox` (or the first call for a pod)
reattaches to the monitor found in the pod's directory, and WatchExits replays the exits that
happened meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message
from opentelemetry import propagate
from opentelemetry.trace import SpanKind

from pycrio.config import Config, TracingConfig
from pycrio.errors import (
    AlreadyExists,
    CRIError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    Unimplemented,
)
from pycrio.monitor import framing, monitor_pb2
from pycrio.oci import cgroups
from pycrio.oci.runtime import (
    EXEC_OUTPUT_LIMIT,
    STATE_CREATED,
    STATE_RUNNING,
    STATE_STOPPED,
    ContainerHandle,
    ExecResult,
    Runtime,
    RuntimeCommandError,
    RuntimeStatus,
    SandboxHandle,
    log,
    log_command,
)
from pycrio.oci.runtime_oci import OCIRuntime, _binary_runs, _read_int, _tail, _wait_for
from pycrio.oci.runtime_oci import _write_atomic as _write_text
from pycrio.procfs import process_start_time, same_process
from pycrio.streaming.session import ClientGone
from pycrio.tracing import child_span, step_span
from pycrio.tracing.call import new_request_id

if TYPE_CHECKING:
    from pycrio.streaming.session import SessionIO

MONITOR_BINARY = "pycrio-monitor"
SPAWN_TIMEOUT = 30.0  # the monitor forks, joins its cgroup, binds its socket, then its parent exits
CALL_TIMEOUT = 120.0  # a create runs `runc create`: as long as the "oci" runtime allows its commands
SHORT_TIMEOUT = 10.0  # calls that do no runtime work (state, version, shutdown, tracing)
EXEC_SYNC_MARGIN = 30.0  # over an ExecSync's own timeout: the monitor kills the tree, then answers
SHUTDOWN_WAIT = 10.0  # for the monitor's exit after Shutdown, before it is killed
DEAD_EXIT_CODE = 255  # what a container whose monitor died without recording its exit reports
_POOL_SIZE = 4
_WATCH_RETRY = 0.5
_DEATH_WAIT = 2.0  # after its WatchExits stream ended: how long the monitor's pid may take to go
_SUN_PATH_MAX = 107  # sockaddr_un's sun_path holds 108 bytes with the NUL
_PID_WAIT = 2.0


# Request.op field -> the method name of the CLIENT span
METHODS = {
    "version": "Version",
    "create_container": "CreateContainer",
    "start_container": "StartContainer",
    "exec_sync": "ExecSync",
    "kill_container": "KillContainer",
    "container_state": "ContainerState",
    "watch_exits": "WatchExits",
    "reopen_log": "ReopenLog",
    "set_window_size": "SetWindowSize",
    "serve_exec": "ServeExec",
    "serve_attach": "ServeAttach",
    "delete_container": "DeleteContainer",
    "configure_tracing": "ConfigureTracing",
    "shutdown": "Shutdown",
}

_ERRORS: dict[int, type[CRIError]] = {
    grpc.StatusCode.NOT_FOUND.value[0]: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION.value[0]: FailedPrecondition,
    grpc.StatusCode.INVALID_ARGUMENT.value[0]: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS.value[0]: AlreadyExists,
    grpc.StatusCode.UNIMPLEMENTED.value[0]: Unimplemented,
    grpc.StatusCode.UNAVAILABLE.value[0]: Unavailable,
    grpc.StatusCode.PERMISSION_DENIED.value[0]: PermissionDenied,
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class MonitorUnreachable(Unavailable):
    """The monitor's socket refused us, or the connection ended before an answer."""


def response_error(response: monitor_pb2.Response) -> CRIError:
    """The CRIError a non-OK Response stands for (its code and message)."""
    message = response.error or f"pycrio-monitor failed with code {response.code}"
    kind = _ERRORS.get(response.code)
    if kind is not None:
        return kind(message)
    code = _CODES.get(response.code, grpc.StatusCode.UNKNOWN)
    return CRIError(message, code if code != grpc.StatusCode.OK else grpc.StatusCode.UNKNOWN)


def monitor_binary() -> str:
    """pycrio-monitor of this installation (beside our interpreter), else the one in PATH."""
    beside = Path(sys.executable).parent / MONITOR_BINARY
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(MONITOR_BINARY) or MONITOR_BINARY


def tracing_settings(config: TracingConfig, relay: Path | None = None) -> monitor_pb2.TracingSettings:
    return monitor_pb2.TracingSettings(
        enabled=config.enable_tracing,
        endpoint=config.tracing_endpoint,
        sampling_rate_per_million=config.tracing_sampling_rate_per_million,
        relay_socket=str(relay) if relay else "",
    )


def _client_span(method: str, pod_id: str, container_id: str, request_uuid: str) -> contextlib.AbstractContextManager[Any]:
    """The CLIENT span of one monitor call, child of the current call (none without one)."""
    attributes = {"pod.id": pod_id, "uuid": request_uuid, "rpc.system": "pycrio-monitor", "rpc.method": method}
    if container_id:
        attributes["container_id"] = container_id
    return child_span(f"pycrio-monitor-client: {method}", SpanKind.CLIENT, attributes)


def _request(op: str, message: Message) -> monitor_pb2.Request:
    request = monitor_pb2.Request(uuid=new_request_id())
    getattr(request, op).CopyFrom(message)
    return request


def _inject(request: monitor_pb2.Request) -> None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)  # the current span's context (the CLIENT span's, inside one)
    request.trace.update(carrier)


# -- the client ------------------------------------------------------------------------------


class MonitorClient:
    """Blocking calls to one monitor; thread-safe. A call takes an idle connection of the pool
    (or opens one) and puts it back after a complete answer; streams get their own."""

    def __init__(self, socket_path: Path, pod_id: str, pool_size: int = _POOL_SIZE) -> None:
        self.socket_path = Path(socket_path)
        self.pod_id = pod_id
        self.pool_size = pool_size
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- connections -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _address(self) -> Iterator[str]:
        """A path to the socket that fits sun_path: its own, else through an fd of its directory."""
        path = str(self.socket_path)
        if len(os.fsencode(path)) <= _SUN_PATH_MAX:
            yield path
            return
        try:
            fd = os.open(self.socket_path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise MonitorUnreachable(f"pycrio-monitor of pod {self.pod_id}: {self.socket_path.parent}: {exc.strerror}") from exc
        try:
            yield f"/proc/self/fd/{fd}/{self.socket_path.name}"
        finally:
            os.close(fd)

    def connect(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout if timeout is None else min(timeout, SHORT_TIMEOUT))
        try:
            with self._address() as address:
                sock.connect(address)
        except (OSError, CRIError) as exc:
            sock.close()
            if isinstance(exc, CRIError):
                raise
            raise MonitorUnreachable(
                f"cannot connect to pycrio-monitor of pod {self.pod_id} at {self.socket_path}: {exc.strerror or exc}"
            ) from exc
        return sock

    async def connect_async(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            with self._address() as address:
                await asyncio.wait_for(loop.sock_connect(sock, address), SHORT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise MonitorUnreachable(
                f"cannot connect to pycrio-monitor of pod {self.pod_id} at {self.socket_path}: {exc}"
            ) from exc
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_unix_connection(sock=sock, limit=framing.MAX_FRAME + 4)

    def _take(self) -> socket.socket | None:
        """An idle connection the monitor still holds open (one it closed is dropped here, before
        a request is sent on it: a request once sent is never sent again)."""
        while True:
            with self._lock:
                sock = self._idle.pop() if self._idle else None
            if sock is None or _still_open(sock):
                return sock
            sock.close()

    def _give_back(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.pool_size:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        """Close the idle connections (calls in flight finish on theirs)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    # -- calls -------------------------------------------------------------------------------

    def call(self, op: str, message: Message, *, timeout: float | None = CALL_TIMEOUT, container_id: str = "") -> monitor_pb2.Response:
        """Send one request and return its OK Response; a non-OK one raises its CRIError."""
        request = _request(op, message)
        method = METHODS[op]
        with _client_span(method, self.pod_id, container_id, request.uuid):
            _inject(request)
            log.debug("pycrio-monitor of pod %s: %s %s", self.pod_id, method, container_id)
            response = self._exchange(request, method, timeout)
            if response.code != 0:
                raise response_error(response)
            return response

    def _exchange(self, request: monitor_pb2.Request, method: str, timeout: float | None) -> monitor_pb2.Response:
        pooled = self._take()
        sock = pooled or self.connect(timeout)
        try:
            try:
                sock.settimeout(timeout)
                framing.write_sync(sock, request)
                response = framing.read_sync(sock, monitor_pb2.Response)
            except (BrokenPipeError, ConnectionResetError):
                response = None
            if response is None and pooled is not None and request.WhichOneof("op") in _IDEMPOTENT:
                # the monitor closed that idle connection as we sent: a question may be asked again
                sock.close()
                sock = self.connect(timeout)
                sock.settimeout(timeout)
                framing.write_sync(sock, request)
                response = framing.read_sync(sock, monitor_pb2.Response)
        except TimeoutError as exc:
            sock.close()
            raise CRIError(
                f"pycrio-monitor of pod {self.pod_id} did not answer {method} within {timeout:.0f}s",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from exc
        except (OSError, framing.FrameError) as exc:
            sock.close()
            raise MonitorUnreachable(f"pycrio-monitor of pod {self.pod_id}: {method}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        if response is None:
            sock.close()
            raise MonitorUnreachable(f"pycrio-monitor of pod {self.pod_id} closed the connection during {method}")
        self._give_back(sock)
        return response

    def open_stream(self, op: str, message: Message, *, container_id: str = "") -> socket.socket:
        """A connection of its own turned into `op`'s stream (its OK Response read); blocking,
        without a timeout (the caller shuts it down to stop reading)."""
        request = _request(op, message)
        method = METHODS[op]
        with _client_span(method, self.pod_id, container_id, request.uuid):
            _inject(request)
            sock = self.connect(SHORT_TIMEOUT)
            try:
                framing.write_sync(sock, request)
                response = framing.read_sync(sock, monitor_pb2.Response)
            except (OSError, framing.FrameError) as exc:
                sock.close()
                raise MonitorUnreachable(f"pycrio-monitor of pod {self.pod_id}: {method}: {exc}") from exc
            if response is None:
                sock.close()
                raise MonitorUnreachable(f"pycrio-monitor of pod {self.pod_id} closed the connection during {method}")
            if response.code != 0:
                sock.close()
                raise response_error(response)
            sock.settimeout(None)
            return sock


# -- one pod's monitor -------------------------------------------------------------------------


class _Monitor:
    """What the daemon knows of one pod's monitor: where it is, whether it lives, its containers."""

    def __init__(self, pod_id: str, directory: Path) -> None:
        self.pod_id = pod_id
        self.directory = directory  # <pod dir>/monitor
        self.client = MonitorClient(directory / "monitor.sock", pod_id)
        self.containers: set[str] = set()  # reported stopped if the monitor dies
        # each container's state as the monitor last told it (create, start, WatchExits): the
        # monitor reports every change as it happens, so status() need not ask (kubelet polls)
        self.states: dict[str, monitor_pb2.ContainerState] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # notified when a state is remembered or it dies
        self.dead = False
        self.closing = False  # Shutdown sent (or being sent): its stream's end is expected
        self.watcher: threading.Thread | None = None
        self.watch_socket: socket.socket | None = None
        self.stop_watching = threading.Event()
        self._pid = 0

    @property
    def pidfile(self) -> Path:
        return self.directory / "monitor.pid"

    @property
    def start_file(self) -> Path:
        # the monitor's start time as we first saw it: a recycled pid is not our monitor
        return self.directory / "monitor.start"

    @property
    def log_file(self) -> Path:
        return self.directory / "monitor.log"

    @property
    def exits_dir(self) -> Path:
        return self.directory / "exits"

    def pid(self) -> int:
        """The monitor's pid, from its pid file the first time (it removes the file as it exits,
        still flushing its spans: the process, not the file, says when it is gone)."""
        if not self._pid:
            self._pid = _read_int(self.pidfile)
        return self._pid

    def record_start(self) -> None:
        pid = _wait_for(self.pid, _PID_WAIT)
        start = process_start_time(pid) if pid else 0
        if start:
            _write_text(self.start_file, str(start))

    def alive(self) -> bool:
        """Whether the monitor's process runs (a zombie or a recycled pid does not)."""
        pid = self.pid()
        if not pid:
            return False
        recorded = _read_int(self.start_file)
        return same_process(pid, recorded) if recorded else process_start_time(pid) > 0

    def recorded_exit(self, container_id: str) -> dict[str, Any] | None:
        """The exit the monitor wrote for a container before it reported it, if any."""
        try:
            record = json.loads((self.exits_dir / f"{container_id}.json").read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and "exit_code" in record else None


# -- the runtime -------------------------------------------------------------------------------


class _Shared:
    """State of one "pod" handler shared by its per-pod instances."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.monitors: dict[str, _Monitor] = {}
        self.starting: dict[str, tuple[_Monitor, concurrent.futures.Future[None]]] = {}  # create_sandbox -> wait_sandbox
        self.instances: dict[str, PodRuntime] = {}
        self.exit_callback: Any = None


class PodRuntime(OCIRuntime):
    """runc driven by one pycrio-monitor per pod; `for_sandbox(pod_id)` is that pod's instance."""

    def __init__(
        self,
        name: str,
        runtime_path: str,
        runtime_root: Path,
        *,
        pods_dir: Path,
        config: Config | None = None,
        monitor_path: str = "",
    ) -> None:
        super().__init__(name, runtime_path, runtime_root)
        self.pods_dir = Path(pods_dir)  # pod directories (<runroot>/pods): <pods_dir>/<pod id>/monitor
        self.config = config or Config()  # the daemon's, updated in place by a reload
        self.monitor_path = monitor_path or monitor_binary()
        self.pod_id = ""  # "" for the handler's own instance
        self.spawn_timeout = SPAWN_TIMEOUT
        # monitors are forked from one pre-imported zygote: their pages stay shared (PSS per pod
        # 19 -> 6 MiB at 50 pods, pycrio.monitor.zygote); it serves this daemon's runroot only
        # (our own monitor only: another monitor binary is run as a command)
        self.zygote_socket: Path | None = None if monitor_path else self.pods_dir.parent / "monitor-zygote.sock"
        # the daemon's span relay (pycrio.tracing.relay): monitors send their spans there instead
        # of holding an OTLP channel each; None: they export to the endpoint themselves
        self.span_relay: Path | None = None
        self._shared = _Shared()

    # the exit callback is the handler's, whichever instance it was set on
    @property  # type: ignore[override]
    def _exit_callback(self) -> Any:
        return self._shared.exit_callback

    @_exit_callback.setter
    def _exit_callback(self, callback: Any) -> None:
        self._shared.exit_callback = callback

    def close(self) -> None:
        """At daemon shutdown: stop the monitor zygote (the pods' monitors run on without it)."""
        from pycrio.monitor.zygote import stop_zygote

        if self.zygote_socket is not None and stop_zygote(self.zygote_socket):
            log.info("stopped the pycrio-monitor zygote on %s", self.zygote_socket)

    # -- pods and handles --------------------------------------------------------------------

    def for_sandbox(self, sandbox_id: str) -> "PodRuntime":
        shared = self._shared
        with shared.lock:
            instance = shared.instances.get(sandbox_id)
            if instance is None:
                instance = copy.copy(self)
                instance.pod_id = sandbox_id
                shared.instances[sandbox_id] = instance
            return instance

    def container_handle(
        self,
        container_id: str,
        bundle: Path,
        log_path: Path,
        *,
        pod_id: str = "",
        terminal: bool = False,
        stdin: bool = False,
        stdin_once: bool = False,
    ) -> ContainerHandle:
        """The monitor keeps a container's files in its own directory: state_dir is unused."""
        return Runtime.container_handle(
            self, container_id, bundle, log_path, pod_id=pod_id or self.pod_id,
            terminal=terminal, stdin=stdin, stdin_once=stdin_once,
        )  # fmt: skip

    def create_sandbox(self, sandbox: SandboxHandle) -> None:
        """Start the pod's monitor in the background: the fork and the monitor's set-up overlap
        with the pod's namespaces and CNI ADD (RunPodSandbox waits for it in `wait_sandbox`)."""
        monitor = _Monitor(sandbox.id, Path(sandbox.directory) / "monitor")
        cgroup = self._monitor_cgroup(sandbox)
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._shared.lock:
            self._shared.starting[sandbox.id] = (monitor, started)
        call_context = contextvars.copy_context()  # the call's span and request id, for the step

        def start() -> None:
            try:
                with step_span("monitor_start", **{"pod.id": sandbox.id}):
                    self._spawn(monitor, cgroup)
            except BaseException as exc:  # noqa: BLE001 - raised again by wait_sandbox
                started.set_exception(exc)
            else:
                started.set_result(None)

        threading.Thread(
            target=call_context.run, args=(start,), name=f"monitor-start-{sandbox.id[:12]}", daemon=True
        ).start()

    def wait_sandbox(self, sandbox: SandboxHandle) -> None:
        pending = self._take_start(sandbox.id)
        if pending is None:
            return
        monitor, started = pending
        started.result()
        with self._shared.lock:
            self._shared.monitors[sandbox.id] = monitor
        self._ensure_watching(monitor)

    def _take_start(self, pod_id: str) -> tuple[_Monitor, concurrent.futures.Future[None]] | None:
        """The start create_sandbox began for the pod, if nobody waited for it yet."""
        with self._shared.lock:
            return self._shared.starting.pop(pod_id, None)

    def restore_sandbox(self, sandbox: SandboxHandle) -> None:
        monitor = self._monitor(sandbox.id, Path(sandbox.directory))
        if monitor is None:
            raise NotFound(f"pod {sandbox.id} has no pycrio-monitor directory under {sandbox.directory}")
        if monitor.dead:
            log.warning("pycrio-monitor of pod %s is gone: its containers are reported stopped", sandbox.id)

    def remove_sandbox(self, sandbox: SandboxHandle) -> None:
        directory = Path(sandbox.directory) / "monitor"
        pending = self._take_start(sandbox.id)
        if pending is not None:  # still starting: waited for, whether it comes up or not
            with contextlib.suppress(Exception):
                pending[1].result()
        with step_span("monitor_shutdown", **{"pod.id": sandbox.id}):
            with self._shared.lock:
                monitor = self._shared.monitors.pop(sandbox.id, None)
                self._shared.instances.pop(sandbox.id, None)
            if monitor is None and directory.exists():
                monitor = _Monitor(sandbox.id, directory)
            if monitor is not None:
                self._shutdown(monitor)
            shutil.rmtree(directory, ignore_errors=True)
            cgroup = self._monitor_cgroup(sandbox)
            if cgroup != sandbox.cgroup_parent:
                cgroups.remove_cgroup(cgroup)

    def _monitor_cgroup(self, sandbox: SandboxHandle) -> str:
        """The cgroup the pod's monitor runs in: the pod's, unless pycrio made that one, as it
        removes it at StopPodSandbox while the monitor still serves: then one beside it."""
        parent = sandbox.cgroup_parent.rstrip("/")
        if not parent:
            return ""
        own = f"{self.config.runtime.pod_cgroup_parent.rstrip('/')}/{sandbox.id}"
        return f"{parent}-monitor" if parent == own else parent

    def _monitor(self, pod_id: str, pod_dir: Path | None = None) -> _Monitor | None:
        """The pod's monitor, attached from its directory the first time (after a restart)."""
        if not pod_id:
            return None
        shared = self._shared
        with shared.lock:
            monitor = shared.monitors.get(pod_id)
            if monitor is None:
                directory = (pod_dir or self.pods_dir / pod_id) / "monitor"
                if not directory.exists():
                    return None
                monitor = shared.monitors[pod_id] = _Monitor(pod_id, directory)
                if not monitor.alive():
                    monitor.dead = True
        self._ensure_watching(monitor)
        return monitor

    def _monitor_of(self, handle: ContainerHandle) -> _Monitor | None:
        return self._monitor(self.pod_id or handle.pod_id)

    def _live_monitor(self, handle: ContainerHandle, what: str) -> _Monitor:
        monitor = self._monitor_of(handle)
        pod_id = self.pod_id or handle.pod_id
        if monitor is None:
            raise FailedPrecondition(f"pod {pod_id or '?'} has no pycrio-monitor: cannot {what}")
        if monitor.dead:
            raise FailedPrecondition(f"pycrio-monitor of pod {pod_id} exited: cannot {what}")
        return monitor

    # -- spawning and shutting down ---------------------------------------------------------

    def _monitor_argv(self, monitor: _Monitor, cgroup: str) -> list[str]:
        tracing = self.config.tracing
        argv = [
            self.monitor_path,
            "--pod-id", monitor.pod_id,
            "--socket", str(monitor.client.socket_path),
            "--state-dir", str(monitor.directory),
            "--runtime-path", shutil.which(self.runtime_path) or self.runtime_path,
            "--runtime-root", str(self.runtime_root),
            "--log-level", self.config.log_level,
            "--log-file", str(monitor.log_file),
        ]  # fmt: skip
        if self.zygote_socket is not None:
            argv += ["--zygote-socket", str(self.zygote_socket)]
        if cgroup:
            argv += ["--cgroup", cgroup]
        if tracing.enable_tracing:
            argv += [
                "--enable-tracing",
                "--tracing-endpoint", tracing.tracing_endpoint,
                "--tracing-sampling-rate-per-million", str(tracing.tracing_sampling_rate_per_million),
            ]  # fmt: skip
            if self.span_relay is not None:
                argv += ["--tracing-relay", str(self.span_relay)]
        return argv

    def _spawn(self, monitor: _Monitor, cgroup: str) -> None:
        """Have the zygote fork the pod's monitor (in-process: no Python start per pod), or run
        the monitor command and wait for its exit: 0 once the daemonized monitor serves."""
        monitor.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        argv = self._monitor_argv(monitor, cgroup)
        what = f"start pycrio-monitor of pod {monitor.pod_id}"
        if self.zygote_socket is not None:
            self._fork_from_zygote(monitor, argv, what)
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith(("_OCI_", "NOTIFY_SOCKET", "LISTEN_"))}
        log_command(argv)
        # files, not pipes: the daemonized monitor may keep what it inherited open for its life
        with tempfile.TemporaryFile() as output:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=env, start_new_session=True
                )
            except OSError as exc:
                raise RuntimeCommandError(argv, str(exc), what=what) from exc
            try:
                code = proc.wait(timeout=self.spawn_timeout)
            except subprocess.TimeoutExpired as exc:
                proc.kill()
                proc.wait()
                self._kill(monitor)
                raise RuntimeCommandError(
                    argv, f"it did not report serving within {self.spawn_timeout:.0f}s. {_tail(monitor.log_file)}",
                    what=what,
                ) from exc
            output.seek(0)
            text = output.read().decode(errors="replace")
        if code != 0:
            self._kill(monitor)
            detail = text.strip() or _tail(monitor.log_file) or "no error output"
            raise RuntimeCommandError(argv, detail, code, what)
        monitor.record_start()
        if not monitor.alive():
            raise RuntimeCommandError(argv, f"it exited 0 but no monitor runs. {_tail(monitor.log_file)}", 0, what)
        log.info("pycrio-monitor of pod %s running (pid %d)", monitor.pod_id, monitor.pid())

    def _fork_from_zygote(self, monitor: _Monitor, argv: list[str], what: str) -> None:
        from pycrio.monitor.zygote import ZygoteError, request_monitor

        log_command(argv)
        with step_span("monitor_fork", **{"pod.id": monitor.pod_id}):
            try:
                answer = request_monitor(self.zygote_socket, argv[1:])
            except ZygoteError as exc:
                self._kill(monitor)
                raise RuntimeCommandError(argv, str(exc), what=what) from exc
        if not answer.startswith("ready"):
            self._kill(monitor)
            detail = answer.removeprefix("error ").strip() or _tail(monitor.log_file) or "no error output"
            raise RuntimeCommandError(argv, detail, 1, what)
        monitor.record_start()
        if not monitor.alive():
            raise RuntimeCommandError(argv, f"it reported ready but no monitor runs. {_tail(monitor.log_file)}", 0, what)
        log.info("pycrio-monitor of pod %s running (pid %d, forked by the zygote)", monitor.pod_id, monitor.pid())

    def _shutdown(self, monitor: _Monitor) -> None:
        """Shutdown, wait for the pid to go (killed after SHUTDOWN_WAIT); a dead one is fine."""
        monitor.closing = True
        self._stop_watching(monitor)
        if not monitor.dead and monitor.alive():
            try:
                monitor.client.call("shutdown", monitor_pb2.ShutdownRequest(), timeout=SHORT_TIMEOUT)
            except CRIError as exc:
                log.warning("pycrio-monitor of pod %s: Shutdown: %s", monitor.pod_id, exc)
            if not _wait_for(lambda: not monitor.alive(), SHUTDOWN_WAIT):
                log.warning("pycrio-monitor of pod %s did not exit after Shutdown: killing it", monitor.pod_id)
                self._kill(monitor)
        monitor.dead = True
        monitor.client.close()

    def _kill(self, monitor: _Monitor) -> None:
        pid = monitor.pid()
        if pid and (monitor.alive() or not monitor.start_file.exists()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_for(lambda: process_start_time(pid) == 0, SHUTDOWN_WAIT)

    def configure_tracing(self, config: TracingConfig) -> None:
        """Send the daemon's new tracing settings to every live monitor (in the background: a
        reload must not wait for a hung monitor)."""
        with self._shared.lock:
            monitors = [m for m in self._shared.monitors.values() if not m.dead and not m.closing]
        request = monitor_pb2.ConfigureTracingRequest(tracing=tracing_settings(config, self.span_relay))

        def send(monitor: _Monitor) -> None:
            try:
                monitor.client.call("configure_tracing", request, timeout=SHORT_TIMEOUT)
            except CRIError as exc:
                log.warning("pycrio-monitor of pod %s: ConfigureTracing: %s", monitor.pod_id, exc)

        for monitor in monitors:
            threading.Thread(target=send, args=(monitor,), name=f"monitor-tracing-{monitor.pod_id[:12]}", daemon=True).start()

    # -- exits -------------------------------------------------------------------------------

    def report_exits(self, callback: Any) -> None:
        self._exit_callback = callback
        with self._shared.lock:
            monitors = list(self._shared.monitors.values())
        for monitor in monitors:
            if callback is None:
                self._stop_watching(monitor)
            else:
                self._ensure_watching(monitor)

    def restore(self, handle: ContainerHandle) -> None:
        monitor = self._monitor_of(handle)
        if monitor is None:
            raise NotFound(f"container {handle.id}: pod {handle.pod_id or self.pod_id} has no pycrio-monitor")
        with monitor.lock:
            monitor.containers.add(handle.id)
        if monitor.dead:
            self._report_exit(handle.id)

    def _ensure_watching(self, monitor: _Monitor) -> None:
        if self._exit_callback is None or monitor.dead or monitor.closing:
            return
        with monitor.lock:
            if monitor.watcher is not None and monitor.watcher.is_alive():
                return
            monitor.stop_watching.clear()
            monitor.watcher = threading.Thread(
                target=self._watch, args=(monitor,), name=f"monitor-exits-{monitor.pod_id[:12]}", daemon=True
            )
            monitor.watcher.start()

    def _stop_watching(self, monitor: _Monitor) -> None:
        monitor.stop_watching.set()
        sock = monitor.watch_socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        watcher = monitor.watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(5)

    def _watch(self, monitor: _Monitor) -> None:
        """WatchExits until told to stop, the pod is removed, or the monitor died."""
        while not monitor.stop_watching.is_set():
            try:
                sock = monitor.client.open_stream("watch_exits", monitor_pb2.WatchExitsRequest())
            except CRIError as exc:
                if self._check_death(monitor, 0.0):
                    return
                log.debug("pycrio-monitor of pod %s: WatchExits: %s", monitor.pod_id, exc)
                monitor.stop_watching.wait(_WATCH_RETRY)
                continue
            monitor.watch_socket = sock
            try:
                if monitor.stop_watching.is_set():
                    return
                while True:
                    frame = framing.read_sync(sock, monitor_pb2.StreamFrame)
                    if frame is None:
                        break
                    if frame.WhichOneof("frame") == "exit":
                        self._remember(monitor, frame.exit)  # before the report: status() says it
                        self._report_exit(frame.exit.container_id)
            except (OSError, framing.FrameError) as exc:
                if not monitor.stop_watching.is_set():
                    log.debug("pycrio-monitor of pod %s: WatchExits ended: %s", monitor.pod_id, exc)
            finally:
                monitor.watch_socket = None
                sock.close()
            if monitor.stop_watching.is_set() or monitor.closing:
                return
            if self._check_death(monitor, _DEATH_WAIT):
                return
            monitor.stop_watching.wait(_WATCH_RETRY)  # it lives: watch again

    def _check_death(self, monitor: _Monitor, wait: float) -> bool:
        """Whether the monitor is gone (waiting up to `wait` s for its pid to go); if so its
        containers are reported."""
        if monitor.closing:
            return True
        if not _wait_for(lambda: not monitor.alive(), wait):
            return False
        self._monitor_died(monitor)
        return True

    def _monitor_died(self, monitor: _Monitor) -> None:
        with monitor.lock:
            if monitor.dead or monitor.closing:
                return
            monitor.dead = True
            monitor.changed.notify_all()
            containers = sorted(monitor.containers)
        log.warning(
            "pycrio-monitor of pod %s exited: its containers (%d) are stopped", monitor.pod_id, len(containers)
        )
        monitor.client.close()
        for container_id in containers:
            self._report_exit(container_id)

    def _dead_status(self, monitor: _Monitor, handle: ContainerHandle) -> RuntimeStatus:
        """A container of a dead monitor: the exit it recorded, else 255 with the reason."""
        recorded = monitor.recorded_exit(handle.id)
        if recorded is not None:
            finished = int(recorded.get("finished_at") or 0)
            return RuntimeStatus(
                STATE_STOPPED,
                exit_code=int(recorded["exit_code"]),
                started_at=min(int(recorded.get("started_at") or 0), finished) if finished else 0,
                finished_at=finished,
                oom_killed=bool(recorded.get("oom_killed")),
            )
        return RuntimeStatus(
            STATE_STOPPED, exit_code=DEAD_EXIT_CODE, message=f"pycrio-monitor of pod {monitor.pod_id} exited"
        )

    # -- Runtime -----------------------------------------------------------------------------

    def _call(
        self, monitor: _Monitor, op: str, message: Message, container_id: str, timeout: float | None = CALL_TIMEOUT
    ) -> monitor_pb2.Response:
        """A call to a live monitor; a connection failure that finds it dead says so."""
        try:
            return monitor.client.call(op, message, timeout=timeout, container_id=container_id)
        except MonitorUnreachable as exc:
            if self._check_death(monitor, 0.0):
                raise FailedPrecondition(f"pycrio-monitor of pod {monitor.pod_id} exited: {METHODS[op]} failed") from exc
            raise

    def create(self, handle: ContainerHandle) -> int:
        with step_span("runtime_create", **{"container.id": handle.id}):
            monitor = self._live_monitor(handle, f"create container {handle.id}")
            handle.log_path.parent.mkdir(parents=True, exist_ok=True)
            with monitor.lock:
                monitor.containers.add(handle.id)
            request = monitor_pb2.CreateContainerRequest(
                container_id=handle.id, bundle=str(handle.bundle), log_path=str(handle.log_path),
                terminal=handle.terminal, stdin=handle.stdin, stdin_once=handle.stdin_once,
            )  # fmt: skip
            try:
                response = self._call(monitor, "create_container", request, handle.id, self.create_timeout)
            except BaseException:
                with monitor.lock:
                    monitor.containers.discard(handle.id)
                raise
            pid = response.create_container.pid
            created = monitor_pb2.ContainerState(
                container_id=handle.id, state="created", pid=pid, pid_start_time=process_start_time(pid) if pid else 0
            )
            self._remember(monitor, created)
            return pid

    def start(self, handle: ContainerHandle) -> None:
        with step_span("runtime_start", **{"container.id": handle.id}):
            monitor = self._live_monitor(handle, f"start container {handle.id}")
            request = monitor_pb2.StartContainerRequest(container_id=handle.id)
            response = self._call(monitor, "start_container", request, handle.id, self.command_timeout)
            if response.HasField("start_container") and response.start_container.state:
                self._remember(monitor, response.start_container)
            else:
                self._forget_state(monitor, handle.id)  # an older monitor: ask next time

    @staticmethod
    def _remember(monitor: _Monitor, state: monitor_pb2.ContainerState) -> None:
        with monitor.lock:
            known = monitor.states.get(state.container_id)
            if known is not None and known.state == STATE_STOPPED and state.state != STATE_STOPPED:
                return  # an exit (WatchExits) came first: it is final
            monitor.states[state.container_id] = state
            monitor.changed.notify_all()

    @staticmethod
    def _forget_state(monitor: _Monitor, container_id: str) -> None:
        with monitor.lock:
            monitor.states.pop(container_id, None)

    def kill(self, handle: ContainerHandle, sig: int) -> None:
        with step_span("runtime_kill", **{"container.id": handle.id, "signal": int(sig)}):
            monitor = self._monitor_of(handle)
            if monitor is None or monitor.dead:
                # no monitor to ask: what is left of the container is runc's
                self._runc("kill", handle.id, str(int(sig)), what=f"signal {int(sig)} to container {handle.id}")
                return
            request = monitor_pb2.KillContainerRequest(container_id=handle.id, signal=int(sig))
            self._call(monitor, "kill_container", request, handle.id, self.command_timeout)

    def delete(self, handle: ContainerHandle) -> None:
        with step_span("runtime_delete", **{"container.id": handle.id}):
            monitor = self._monitor_of(handle)
            if monitor is not None and not monitor.dead:
                try:
                    request = monitor_pb2.DeleteContainerRequest(container_id=handle.id)
                    self._call(monitor, "delete_container", request, handle.id, self.command_timeout)
                    self._forget(monitor, handle.id)
                    return
                except NotFound:
                    pass  # the monitor does not know it: runc may still
                except FailedPrecondition:
                    if not monitor.dead:
                        raise
            try:
                self._runc("delete", "--force", handle.id, what=f"delete container {handle.id}")
            except NotFound:
                pass
            if monitor is not None:
                self._forget(monitor, handle.id)

    @staticmethod
    def _forget(monitor: _Monitor, container_id: str) -> None:
        with monitor.lock:
            monitor.containers.discard(container_id)
            monitor.states.pop(container_id, None)

    def status(self, handle: ContainerHandle) -> RuntimeStatus:
        monitor = self._monitor_of(handle)
        if monitor is None:
            raise NotFound(f"container {handle.id} not found: pod {handle.pod_id or self.pod_id or '?'} has no pycrio-monitor")
        if not monitor.dead:
            with monitor.lock:
                # only while WatchExits runs is the remembered state kept current
                known = monitor.states.get(handle.id) if self._watching(monitor) else None
            if known is not None:
                return _runtime_status(known)
            request = monitor_pb2.ContainerStateRequest(container_id=handle.id)
            try:
                state = monitor.client.call("container_state", request, timeout=SHORT_TIMEOUT, container_id=handle.id)
            except MonitorUnreachable:
                if not self._check_death(monitor, 0.0):
                    raise
            else:
                if state.container_state.state in (STATE_CREATED, STATE_RUNNING, STATE_STOPPED):
                    self._remember(monitor, state.container_state)
                return _runtime_status(state.container_state)
        return self._dead_status(monitor, handle)

    def wait_stopped(self, handle: ContainerHandle, timeout: float) -> bool:
        """Until the monitor reports the exit (WatchExits), without polling; polls when no
        WatchExits runs."""
        monitor = self._monitor_of(handle)
        if monitor is None or not self._watching(monitor):
            return super().wait_stopped(handle, timeout)
        if self.status(handle).state == STATE_STOPPED:  # remembered, or asked once
            return True
        with monitor.changed:
            def stopped() -> bool:
                known = monitor.states.get(handle.id)
                return monitor.dead or (known is not None and known.state == STATE_STOPPED)

            monitor.changed.wait_for(stopped, timeout)
        return self.status(handle).state == STATE_STOPPED

    def _signal_unless_stopped(self, handle: ContainerHandle, sig: int) -> None:
        """kill(), tolerating a container that exits as the signal goes: the monitor (runc) says
        "not running" before its exit report arrives, so wait for that report before failing."""
        try:
            self.kill(handle, sig)
        except FailedPrecondition:
            monitor = self._monitor_of(handle)
            if monitor is not None:
                self._forget_state(monitor, handle.id)  # ask the monitor, not what we remembered
            if not self.wait_stopped(handle, _EXIT_REPORT_WAIT):
                raise

    @staticmethod
    def _watching(monitor: _Monitor) -> bool:
        watcher = monitor.watcher
        return watcher is not None and watcher.is_alive() and monitor.watch_socket is not None

    def exec_sync(
        self, handle: ContainerHandle, cmd: list[str], timeout: float | None, output_limit: int = EXEC_OUTPUT_LIMIT
    ) -> ExecResult:
        with step_span("runtime_exec", **{"container.id": handle.id}):
            if not cmd:
                raise InvalidArgument("exec needs a command")
            monitor = self._live_monitor(handle, f"exec in container {handle.id}")
            request = monitor_pb2.ExecSyncRequest(
                container_id=handle.id, cmd=cmd, timeout=timeout or 0.0, output_limit=output_limit
            )
            wait = None if not timeout else timeout + EXEC_SYNC_MARGIN
            result = self._call(monitor, "exec_sync", request, handle.id, wait).exec_sync
            return ExecResult(
                exit_code=result.exit_code, stdout=result.stdout, stderr=result.stderr, timed_out=result.timed_out,
                stdout_truncated=result.stdout_truncated, stderr_truncated=result.stderr_truncated,
            )  # fmt: skip

    def reopen_log(self, handle: ContainerHandle) -> None:
        with step_span("runtime_reopen_log", **{"container.id": handle.id}):
            monitor = self._live_monitor(handle, f"reopen the log of container {handle.id}")
            request = monitor_pb2.ReopenLogRequest(container_id=handle.id)
            self._call(monitor, "reopen_log", request, handle.id, self.command_timeout)

    def _check_available(self) -> tuple[bool, str]:
        usable, why = _binary_runs(self.runtime_path)
        if not usable:
            return False, why
        path = shutil.which(self.monitor_path)
        if path is None:
            return False, f"{self.monitor_path} not found (not an executable file, nor in PATH)"
        return True, ""

    # -- streaming (async, on the stream server's loop) ---------------------------------------

    async def exec_stream(self, handle: ContainerHandle, cmd: list[str], io: SessionIO) -> int:
        if not cmd:
            raise InvalidArgument("exec needs a command")
        request = monitor_pb2.ServeExecRequest(
            container_id=handle.id, cmd=cmd, tty=io.tty, stdin=io.stdin_enabled,
            stdout=io.stdout_enabled, stderr=io.stderr_enabled,
        )  # fmt: skip
        code = await self._serve(handle, "serve_exec", request, io)
        if code is None:
            pod_id = self.pod_id or handle.pod_id
            raise CRIError(f"pycrio-monitor of pod {pod_id} ended the exec in container {handle.id} without an exit code")
        return code

    async def attach_stream(self, handle: ContainerHandle, io: SessionIO) -> None:
        request = monitor_pb2.ServeAttachRequest(
            container_id=handle.id, tty=io.tty, stdin=io.stdin_enabled,
            stdout=io.stdout_enabled, stderr=io.stderr_enabled,
        )  # fmt: skip
        await self._serve(handle, "serve_attach", request, io)

    async def _serve(self, handle: ContainerHandle, op: str, message: Message, io: SessionIO) -> int | None:
        """Open `op`'s stream and pump it until the monitor ends it (its exit code) or the client
        goes (the connection is closed: the monitor kills an exec then)."""
        monitor = self._live_monitor(handle, f"{'exec in' if op == 'serve_exec' else 'attach to'} container {handle.id}")
        request = _request(op, message)
        with _client_span(METHODS[op], monitor.pod_id, handle.id, request.uuid):
            _inject(request)
            reader, writer = await monitor.client.connect_async()
            try:
                await framing.write_async(writer, request)
                response = await framing.read_async(reader, monitor_pb2.Response)
                if response is None:
                    raise MonitorUnreachable(f"pycrio-monitor of pod {monitor.pod_id} closed the {METHODS[op]} stream")
                if response.code != 0:
                    raise response_error(response)
                return await _StreamPump(reader, writer, io, monitor.pod_id).run()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()


class _StreamPump:
    """StreamFrames between one monitor stream and the client's SessionIO."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, io: SessionIO, pod_id: str) -> None:
        self.reader, self.writer, self.io, self.pod_id = reader, writer, io, pod_id

    async def run(self) -> int | None:
        inputs = [asyncio.ensure_future(self._resizes())]
        if self.io.stdin_enabled:
            inputs.append(asyncio.ensure_future(self._stdin()))
        output = asyncio.ensure_future(self._output())
        gone = asyncio.ensure_future(self.io.client_gone.wait())
        try:
            await asyncio.wait({output, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not output.done():
                # the client left: closing the connection makes the monitor end the session
                output.cancel()
                raise ClientGone("the client closed the stream")
            return output.result()
        finally:
            for task in (*inputs, gone, output):
                task.cancel()
            await asyncio.gather(*inputs, gone, output, return_exceptions=True)

    async def _send(self, frame: monitor_pb2.StreamFrame) -> None:
        await framing.write_async(self.writer, frame)

    async def _stdin(self) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await self.io.read_stdin():
                await self._send(monitor_pb2.StreamFrame(stdin=chunk))
            if not self.io.client_gone.is_set():
                await self._send(monitor_pb2.StreamFrame(stdin_eof=True))

    async def _resizes(self) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                size = await self.io.resizes.get()
                await self._send(monitor_pb2.StreamFrame(resize=monitor_pb2.TerminalSize(width=size.width, height=size.height)))

    async def _output(self) -> int | None:
        while True:
            frame = await framing.read_async(self.reader, monitor_pb2.StreamFrame)
            if frame is None:
                if self.io.client_gone.is_set():
                    raise ClientGone("the client closed the stream")
                return None  # an attach ends with the container's output
            kind = frame.WhichOneof("frame")
            if kind == "stdout":
                await self.io.write_stdout(frame.stdout)
            elif kind == "stderr":
                await self.io.write_stderr(frame.stderr)
            elif kind == "exit_code":
                return frame.exit_code
            elif kind == "error":
                raise CRIError(frame.error)


# -- helpers -----------------------------------------------------------------------------------

_EXIT_REPORT_WAIT = 2.0  # s for the exit report of a container the monitor found not running


# requests that change nothing: sent again on a fresh connection when a pooled one turns out closed
# (a create, start or kill once sent is never repeated)
_IDEMPOTENT = frozenset({"version", "container_state", "configure_tracing"})


def _still_open(sock: socket.socket) -> bool:
    """Whether the peer has not closed this idle connection (nothing may be pending on it)."""
    sock.setblocking(False)  # (with a timeout set, Python would wait for data despite MSG_DONTWAIT)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True  # nothing to read: open
    except OSError:
        return False


def _runtime_status(state: monitor_pb2.ContainerState) -> RuntimeStatus:
    stopped = state.state == STATE_STOPPED
    return RuntimeStatus(
        state=state.state or "unknown",
        pid=state.pid,
        pid_start_time=state.pid_start_time,
        exit_code=state.exit_code if stopped and state.exited else None,
        started_at=state.started_at,
        finished_at=state.finished_at,
        oom_killed=state.oom_killed,
        message=state.message,
    )


__all__ = ["METHODS", "MonitorClient", "MonitorUnreachable", "PodRuntime", "monitor_binary", "response_error"]
