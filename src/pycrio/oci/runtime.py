"""The runtime interface: what the server needs from an OCI runtime, whatever drives it.

`OCIRuntime` (conmon + runc, one monitor per container) implements it; a "pod" runtime (one monitor
per pod) fits the same interface: `for_sandbox()` gives the instance that owns a pod's containers,
the sandbox hooks create, restore and remove a pod's runtime side, `container_handle()` lays out
a container's runtime files, and `report_exits()` makes the runtime tell the caller when a
container may have exited (the caller then asks `status()`). Implementations log every command
line they run at DEBUG on `pycrio.oci` as `running: <argv>` (span events) and wrap each operation
in a step span.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pycrio.errors import CRIError, Unimplemented
from pycrio.tracing import step_span

if TYPE_CHECKING:
    from pycrio.streaming.session import SessionIO

log = logging.getLogger("pycrio.oci")

STATE_CREATED = "created"
STATE_RUNNING = "running"
STATE_STOPPED = "stopped"
STATE_UNKNOWN = "unknown"

_POLL_INTERVAL = 0.05
_KILL_WAIT = 10.0
_MAX_ERROR_CHARS = 1000

# ExecSync output kept per stream (CRI-O's maxExecSyncSize); the rest is read and dropped.
EXEC_OUTPUT_LIMIT = 16 * 1024 * 1024

ExitCallback = Callable[[str], None]
"""Called with a container id when that container may have exited (from the runtime's thread)."""


@dataclass
class ContainerHandle:
    """What a runtime needs to know about one container."""

    id: str
    bundle: Path  # holds config.json; the spec's root.path is absolute
    log_path: Path  # CRI log file (k8s-file format)
    state_dir: Path  # per-container dir under the runroot: pidfiles, exit file, attach socket
    terminal: bool = False
    stdin: bool = False
    stdin_once: bool = False
    pod_id: str = ""


@dataclass(frozen=True)
class SandboxHandle:
    """What a runtime needs to know about one pod sandbox."""

    id: str
    directory: Path  # the pod's directory under the runroot; a pod's runtime side may live there
    cgroup_parent: str = ""


@dataclass
class RuntimeStatus:
    """A container's state as the runtime sees it; times are ns since the epoch, taken by the
    runtime itself (started_at when it started the process, finished_at when it reaped it)."""

    state: str  # "created" | "running" | "stopped" | "unknown"
    pid: int = 0
    pid_start_time: int = 0  # of `pid`, see process_start_time()
    exit_code: int | None = None
    started_at: int = 0
    finished_at: int = 0
    oom_killed: bool = False
    message: str = ""


@dataclass
class ExecResult:
    """The outcome of a synchronous exec; on timeout the caller decides what to report.
    Output past the limit was read and dropped: `*_truncated` says so."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False


def runtime_error_text(stderr: bytes | str) -> str:
    """The readable part of a runtime's error output: logrus `msg="..."` values, else the text."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    messages = [_unescape(m) for m in re.findall(r'msg="((?:[^"\\]|\\.)*)"', text)]
    detail = "; ".join(messages) if messages else text.strip()
    if len(detail) > _MAX_ERROR_CHARS:
        detail = detail[:_MAX_ERROR_CHARS] + "..."
    return detail


def _unescape(value: str) -> str:
    return value.replace('\\"', '"').replace("\\\\", "\\")


class RuntimeCommandError(CRIError):
    """A runtime command (runc, conmon) failed; the message names the command and its error."""

    def __init__(self, argv: Sequence[str], stderr: bytes | str, returncode: int | None = None, what: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.detail = runtime_error_text(stderr) or "no error output"
        status = f" (exit {returncode})" if returncode is not None else ""
        prefix = f"{what}: " if what else ""
        super().__init__(f"{prefix}`{shlex.join(self.argv)}` failed{status}: {self.detail}")


def log_command(argv: Sequence[str]) -> None:
    """Log a command line about to run (it becomes a span event of the current call)."""
    log.debug("running: %s", shlex.join(str(a) for a in argv))


def run_command(
    argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None, what: str = ""
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion, logged; a command that cannot run or hangs raises."""
    argv = [str(a) for a in argv]
    log_command(argv)
    try:
        return subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeCommandError(argv, f"timed out after {timeout}s", None, what) from exc
    except OSError as exc:
        raise RuntimeCommandError(argv, str(exc), None, what) from exc


class Runtime(abc.ABC):
    """An OCI runtime as pycrio drives it; calls for different containers may run concurrently."""

    name: str
    _exit_callback: ExitCallback | None = None

    # -- pods and handles ------------------------------------------------------------------

    def for_sandbox(self, sandbox_id: str) -> "Runtime":
        """The instance that runs the containers of pod `sandbox_id` (a per-pod monitor is one
        instance per pod); runtimes without per-pod state are one instance for every pod."""
        return self

    def close(self) -> None:
        """The daemon is stopping: release what serves all pods (not the pods' own parts)."""

    def create_sandbox(self, sandbox: SandboxHandle) -> None:
        """Set up the pod's runtime side (a per-pod monitor) before its first container; it may
        go on in the background while the pod's namespaces and network are made: `wait_sandbox`."""

    def wait_sandbox(self, sandbox: SandboxHandle) -> None:
        """Block until what `create_sandbox` started is done; raise its error if it failed."""

    def restore_sandbox(self, sandbox: SandboxHandle) -> None:
        """Reattach to the pod's runtime side after a daemon restart."""

    def remove_sandbox(self, sandbox: SandboxHandle) -> None:
        """Release the pod's runtime side once its containers are removed; twice is fine."""

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
        """The handle of a container whose spec is in `bundle`; where the runtime keeps its own
        files for it (state_dir) is the runtime's choice."""
        return ContainerHandle(
            id=container_id, bundle=bundle, log_path=log_path, state_dir=bundle / "runtime",
            terminal=terminal, stdin=stdin, stdin_once=stdin_once, pod_id=pod_id,
        )  # fmt: skip

    # -- exits -----------------------------------------------------------------------------

    def report_exits(self, callback: ExitCallback | None) -> None:
        """From now on call `callback(container_id)` when a container of this runtime may have
        exited (None: stop). The callback must be quick and must not raise."""
        self._exit_callback = callback

    def restore(self, handle: ContainerHandle) -> None:
        """Resume supervising a container an earlier daemon run created (report its exit)."""

    def _report_exit(self, container_id: str) -> None:
        callback = self._exit_callback
        if callback is not None:
            try:
                callback(container_id)
            except Exception as exc:  # noqa: BLE001 - a bad callback must not stop the reporting
                log.warning("exit report of container %s failed: %s", container_id, exc)

    # -- containers ------------------------------------------------------------------------

    @abc.abstractmethod
    def create(self, handle: ContainerHandle) -> int:
        """Create the container (not started); return the pid of its init process."""

    @abc.abstractmethod
    def start(self, handle: ContainerHandle) -> None:
        """Start a created container."""

    @abc.abstractmethod
    def kill(self, handle: ContainerHandle, sig: int) -> None:
        """Send `sig` to the container's init process."""

    @abc.abstractmethod
    def delete(self, handle: ContainerHandle) -> None:
        """Remove the container, killing it if needed; a missing container is fine."""

    @abc.abstractmethod
    def status(self, handle: ContainerHandle) -> RuntimeStatus:
        """The container's state; NotFound when the runtime has no trace of it."""

    @abc.abstractmethod
    def exec_sync(
        self, handle: ContainerHandle, cmd: list[str], timeout: float | None, output_limit: int = EXEC_OUTPUT_LIMIT
    ) -> ExecResult:
        """Run `cmd` in the running container and collect its output, at most `output_limit`
        bytes of each stream (the rest is read and dropped)."""

    @abc.abstractmethod
    def reopen_log(self, handle: ContainerHandle) -> None:
        """Make the monitor reopen the container's log file (after rotation)."""

    @abc.abstractmethod
    def update_resources(self, handle: ContainerHandle, linux_resources: dict[str, Any]) -> None:
        """Apply OCI LinuxResources (the spec's JSON form) to the container."""

    @abc.abstractmethod
    def available(self) -> tuple[bool, str]:
        """Whether this runtime can run containers on this host, and why not."""

    # -- streaming (async, on the stream server's loop) -----------------------------------

    async def exec_stream(self, handle: ContainerHandle, cmd: list[str], io: "SessionIO") -> int:
        """Run `cmd` in the running container wired to the client's streams; its exit code."""
        raise Unimplemented(f"runtime {self.name} cannot stream an exec")

    async def attach_stream(self, handle: ContainerHandle, io: "SessionIO") -> None:
        """Connect the client's streams to the container's own stdio until either ends."""
        raise Unimplemented(f"runtime {self.name} cannot attach to a container")

    async def dial_port(
        self, netns_path: str | None, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to `port` on localhost in the network namespace `netns_path`
        (None: the host's)."""
        raise Unimplemented(f"runtime {self.name} cannot forward ports")

    def stop(self, handle: ContainerHandle, timeout: int, stop_signal: int = signal.SIGTERM) -> None:
        """Signal the container, wait up to `timeout` s, then SIGKILL it; a stopped one is left alone."""
        with step_span("runtime_stop", **{"container.id": handle.id}):
            if self.status(handle).state == STATE_STOPPED:
                return
            if timeout > 0 and stop_signal != signal.SIGKILL:
                self._signal_unless_stopped(handle, stop_signal)
                if self.wait_stopped(handle, timeout):
                    return
            self._signal_unless_stopped(handle, signal.SIGKILL)
            if not self.wait_stopped(handle, _KILL_WAIT):
                import grpc

                raise CRIError(
                    f"container {handle.id} still not stopped {_KILL_WAIT:.0f}s after SIGKILL",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )

    def wait_stopped(self, handle: ContainerHandle, timeout: float) -> bool:
        """Poll the status until the container is stopped; False if `timeout` s pass first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.status(handle).state == STATE_STOPPED:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL)

    def _signal_unless_stopped(self, handle: ContainerHandle, sig: int) -> None:
        """kill(), tolerating a container that exits just before the signal lands."""
        try:
            self.kill(handle, sig)
        except CRIError:
            if self.status(handle).state != STATE_STOPPED:
                raise
