"""ContainerSupervisor: the pod's containers for their whole life, inside pycrio-monitor.

conmon-rs's shape, on one asyncio loop (no thread per container):

- create: `runc --root R --log L create --bundle B --pid-file P [--console-socket S] ID`. Without a
  tty runc's stdio are pipes of ours that the container's init inherits (stdout, stderr, and
  stdin when asked for, else /dev/null); with a tty runc sends the pty master over the console
  socket. When `runc create` exits the init is orphaned and, the monitor being a child
  subreaper, becomes our child: the ChildReaper hands us its exit status.
- output: one pump per stream reads the pipe (or pty) and writes the CRI log (container_log) and
  every attach session's queue; a session that does not keep up loses its oldest chunks (as
  conmon-rs's broadcast channel), never the log.
- start: the init `runc create` left waits on runc's exec fifo (`<runtime root>/<id>/exec.fifo`)
  until someone reads it; `runc start` (runc 1.1) does exactly that and removes the fifo. The
  monitor, the init's parent, does it itself (no runc process: ~10 ms less per start) while it
  watches the init's exit instead of runc's 100 ms polls; `runc start` still runs when there is
  no such fifo (another runtime) or the spec has hooks (newer runc runs poststart hooks there).
- exit: the status is taken from the reaper, the output drained, the OOM kill read from the
  container's memory cgroup (its oom_kill counter), then the exit is written atomically to
  `<state_dir>/exits/<id>.json` and only then reported to the watchers. `restore()` reloads
  those records in a new monitor; exits nobody has seen yet go first to the next watcher.
- exec (ExecSync, streaming): `runc exec` through pycrio.oci.streams_oci with the runtime
  helpers of OCIRuntime; ExecSync is an exec whose "client" collects the output and goes away
  at the timeout, which kills the exec'd process tree and reaps it before answering.

Every command runs through asyncio subprocesses (the ChildReaper is asyncio's child watcher in
the monitor): never blocking `subprocess` calls here.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import struct
import tempfile
import termios
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from pycrio import durable
from pycrio.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from pycrio.monitor import monitor_pb2
from pycrio.monitor.child_reaper import ChildReaper
from pycrio.monitor.container_log import STDERR, STDOUT, ContainerLog
from pycrio.oci import streams_oci
from pycrio.oci.runtime import (
    EXEC_OUTPUT_LIMIT,
    STATE_CREATED,
    STATE_RUNNING,
    STATE_STOPPED,
    ContainerHandle,
    RuntimeCommandError,
    RuntimeStatus,
    log_command,
    runtime_error_text,
)
from pycrio.oci.runtime_oci import (
    _COMMAND_TIMEOUT,
    _CREATE_TIMEOUT,
    _NOT_FOUND_HINTS,
    _PRECONDITION_HINTS,
    OCIRuntime,
    _cgroup_oom_kills,
    _read_int,
)
from pycrio.oci.streams_oci import _end_tasks, _read_fd, _ready, _signal_group, _write_fd
from pycrio.procfs import process_start_time
from pycrio.streaming.session import ClientGone, SessionIO
from pycrio.tracing import step_span

log = logging.getLogger("pycrio.monitor")

_READ_BUFFER = 8192  # conmon's STDIO_BUF_SIZE: a longer line reaches the log in P pieces
_ATTACH_BACKLOG = 256  # chunks queued per attach session before its oldest are dropped
_DRAIN_WAIT = 2.0  # after the init exited: how long its output may still come
_DELETE_EXIT_WAIT = 10.0  # after `runc delete --force`: for the init's exit to be handled
_CONSOLE_WAIT = 5.0  # after `runc create` exited: for the pty master to arrive
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes
_EOF = None


@dataclass
class _ExitRecord:
    """What `<state_dir>/exits/<id>.json` holds."""

    exit_code: int
    finished_at: int
    oom_killed: bool
    started_at: int


class _Subscriber:
    """One attach session's view of the container's output: (stream, chunk) items, then None."""

    def __init__(self, container_id: str) -> None:
        self._container_id = container_id
        self._items: deque[tuple[bytes, bytes] | None] = deque()
        self._ready = asyncio.Event()
        self.dropped = 0

    def put(self, item: tuple[bytes, bytes] | None) -> None:
        if item is not None and len(self._items) >= _ATTACH_BACKLOG:
            old = self._items.popleft()
            if not self.dropped:
                log.warning("attach session of container %s does not keep up: dropping its oldest output", self._container_id)
            self.dropped += len(old[1]) if old else 0
        self._items.append(item)
        self._ready.set()

    async def get(self) -> tuple[bytes, bytes] | None:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


@dataclass
class _Container:
    """One container this monitor created, and what it holds for it."""

    handle: ContainerHandle
    log: ContainerLog
    pid: int = 0
    pid_start_time: int = 0
    state: str = STATE_CREATED
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    oom_killed: bool = False
    message: str = ""
    master: int = -1  # tty: the pty master (output, input and window size)
    stdin: int = -1  # no tty, stdin: the write end of the container's stdin pipe
    outputs: list[int] = field(default_factory=list)  # read ends we pump: (fd) stdout[, stderr]
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    supervisor: asyncio.Task[None] | None = None
    exit_status: asyncio.Future[int] | None = None  # the reaper's: done once the init is reaped
    subscribers: set[_Subscriber] = field(default_factory=set)
    output_done: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    deleting: bool = False
    start_by_fifo: bool = False  # the spec has no hooks: start may read runc's exec fifo itself
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def id(self) -> str:
        return self.handle.id

    def fan_out(self, stream: bytes, data: bytes) -> None:
        for subscriber in self.subscribers:
            subscriber.put((stream, data))

    def subscribe(self) -> _Subscriber:
        subscriber = _Subscriber(self.id)
        if self.output_done:
            subscriber.put(_EOF)
        else:
            self.subscribers.add(subscriber)
        return subscriber

    def close_fds(self) -> None:
        for fd in (self.master, self.stdin, *self.outputs):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.master = self.stdin = -1
        self.outputs = []


class _Runc(OCIRuntime):
    """OCIRuntime for its runc helpers (the command prefix, streams_oci's exec), with the
    container states the supervisor knows instead of conmon's files."""

    def __init__(self, supervisor: "ContainerSupervisor", runtime_path: str, runtime_root: Path) -> None:
        super().__init__(Path(runtime_path).name, runtime_path, runtime_root)
        self._supervisor = supervisor

    def status(self, handle: ContainerHandle) -> RuntimeStatus:
        return self._supervisor._runtime_status(handle.id)


class _Capture:
    """An ExecSync stream: keeps `limit` bytes, reads and drops the rest."""

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit
        self.truncated = False

    async def __call__(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        if len(chunk) > room:
            self.truncated = True


class ContainerSupervisor:
    """The containers of one pod (see the module docstring)."""

    def __init__(
        self, pod_id: str, state_dir: Path, runtime_path: str, runtime_root: Path, reaper: ChildReaper
    ) -> None:
        self.pod_id = pod_id
        self.state_dir = Path(state_dir)
        self.exit_dir = self.state_dir / "exits"
        self.containers_dir = self.state_dir / "containers"
        self._reaper = reaper
        self._runc = _Runc(self, runtime_path, Path(runtime_root))
        self._containers: dict[str, _Container] = {}
        self._records: dict[str, monitor_pb2.ContainerState] = {}  # exited in an earlier monitor
        self._unreported: dict[str, tuple[int, monitor_pb2.ContainerState]] = {}  # id -> (seq, state)
        self._watchers: set[asyncio.Queue[tuple[int, monitor_pb2.ContainerState] | None]] = set()
        self._sequence = 0
        self._closed = False
        for directory in (self.exit_dir, self.containers_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # -- start-up ----------------------------------------------------------------------------

    async def restore(self) -> None:
        """Load the exit records an earlier monitor of this pod left (all count as unreported:
        whether the daemon saw them is not known, and a repeated exit is harmless)."""
        durable.remove_temporaries(self.exit_dir)
        for path in sorted(self.exit_dir.glob("*.json")):
            container_id = path.name.removesuffix(".json")
            try:
                record = durable.decode_record(_ExitRecord, path.read_bytes())
            except (OSError, ValueError) as exc:
                durable.quarantine(path, str(exc), log, "exit record")
                continue
            state = monitor_pb2.ContainerState(
                container_id=container_id, state=STATE_STOPPED, exited=True, exit_code=record.exit_code,
                started_at=record.started_at, finished_at=record.finished_at, oom_killed=record.oom_killed,
            )  # fmt: skip
            self._records[container_id] = state
            self._queue_exit(state)
        if self._records:
            log.info("restored the exits of %d container(s) of pod %s", len(self._records), self.pod_id)

    # -- lifecycle ---------------------------------------------------------------------------

    async def create(self, req: monitor_pb2.CreateContainerRequest) -> int:
        """Create the container (its init waits for start); the init's pid."""
        cid = _check_id(req.container_id)
        self._check_open()
        if cid in self._containers or cid in self._records:
            raise AlreadyExists(f"container {cid} already exists in pod {self.pod_id}'s monitor")
        bundle = Path(req.bundle)
        if not (bundle / "config.json").is_file():
            raise InvalidArgument(f"create container {cid}: no config.json in bundle {bundle}")
        if not req.log_path:
            raise InvalidArgument(f"create container {cid}: no log path")
        directory = self.containers_dir / cid
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        handle = ContainerHandle(
            id=cid, bundle=bundle, log_path=Path(req.log_path), state_dir=directory, terminal=req.terminal,
            stdin=req.stdin, stdin_once=req.stdin_once, pod_id=self.pod_id,
        )  # fmt: skip
        container = _Container(handle, ContainerLog(Path(req.log_path), req.log_size_max))
        container.start_by_fifo = b'"hooks"' not in (bundle / "config.json").read_bytes()
        self._containers[cid] = container
        (self.exit_dir / f"{cid}.json").unlink(missing_ok=True)
        try:
            async with container.lock:  # a delete or start of it waits for the create
                with step_span("runtime_create", **{"container.id": cid}):
                    await self._create(container)
        except BaseException:
            try:
                # whatever runc got to (a container, an init waiting for start) goes too
                await asyncio.shield(self._delete_quietly(cid))
            finally:
                self._containers.pop(cid, None)
                await self._release(container)
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return container.pid

    async def _create(self, c: _Container) -> None:
        handle = c.handle
        pidfile = handle.state_dir / "pidfile"
        runc_log = handle.state_dir / "runc.log"
        argv = [*self._runc._runc_prefix(), "--log", str(runc_log), "create", "--bundle", str(handle.bundle),
                "--pid-file", str(pidfile)]  # fmt: skip
        child: list[int] = []  # the ends the init inherits: closed here once runc has them
        console: socket.socket | None = None
        console_dir: str | None = None
        receive: asyncio.Task[int] | None = None
        try:
            with step_span("log_pipe_setup", **{"container.id": handle.id}):
                c.log.open()
                if handle.terminal:
                    console, console_dir = _console_socket(handle.state_dir)
                    argv += ["--console-socket", console.getsockname()]
                    stdio: dict[str, Any] = {
                        "stdin": asyncio.subprocess.DEVNULL, "stdout": asyncio.subprocess.DEVNULL,
                        "stderr": asyncio.subprocess.PIPE,
                    }  # fmt: skip
                    receive = asyncio.ensure_future(_receive_console(console))
                else:
                    stdio = {"stdin": asyncio.subprocess.DEVNULL}
                    if handle.stdin:
                        read, write = os.pipe()
                        child.append(read)
                        c.stdin = write
                        os.set_blocking(write, False)
                        stdio["stdin"] = read
                    for name in ("stdout", "stderr"):
                        read, write = os.pipe()
                        child.append(write)
                        c.outputs.append(read)
                        os.set_blocking(read, False)
                        stdio[name] = write
            argv.append(handle.id)
            log_command(argv)
            try:
                proc = await asyncio.create_subprocess_exec(*argv, **stdio, start_new_session=True)
            except OSError as exc:
                raise RuntimeCommandError(argv, str(exc), what=f"create container {handle.id}") from exc
            finally:
                for fd in child:
                    os.close(fd)  # runc and the init hold them now
                child = []
            try:
                _, err = await asyncio.wait_for(proc.communicate(), _CREATE_TIMEOUT)
            except BaseException as exc:  # timed out, or cancelled: runc must not go on alone
                _signal_group(proc.pid, signal.SIGKILL)
                await asyncio.shield(proc.wait())
                if isinstance(exc, TimeoutError):
                    raise RuntimeCommandError(argv, f"timed out after {_CREATE_TIMEOUT:.0f}s",
                                              what=f"create container {handle.id}") from None  # fmt: skip
                raise
            if proc.returncode != 0:
                detail = _read_text(runc_log) or err or _drain(c.outputs[1:])
                raise RuntimeCommandError(argv, detail, proc.returncode, f"create container {handle.id}")
            pid = _read_int(pidfile)
            if receive is not None:
                try:
                    c.master = await asyncio.wait_for(asyncio.shield(receive), _CONSOLE_WAIT)
                except (TimeoutError, OSError) as exc:
                    raise RuntimeCommandError(argv, f"no terminal from the console socket: {exc or 'timed out'}",
                                              what=f"create container {handle.id}") from exc  # fmt: skip
                _prepare_master(c.master)
            # the init is our child now (or was: the reaper keeps a status nobody waited for yet)
            exit_code = self._reaper.wait(pid) if pid > 0 else None
            if exit_code is None or (exit_code.done() and exit_code.exception() is not None):
                raise FailedPrecondition(
                    f"create container {handle.id}: its init (pid {pid}, from {pidfile}) is not a child "
                    f"of the monitor (the monitor must be a child subreaper)"
                )
        finally:
            for fd in child:
                os.close(fd)
            if receive is not None and not receive.done():
                receive.cancel()
            if console is not None:
                console.close()
            if console_dir is not None:
                shutil.rmtree(console_dir, ignore_errors=True)
            runc_log.unlink(missing_ok=True)
        assert exit_code is not None
        c.pid = pid
        c.pid_start_time = process_start_time(pid)
        if handle.terminal:
            c.outputs = []
            c.pumps = [asyncio.ensure_future(self._pump(c, c.master, STDOUT))]
        else:
            c.pumps = [asyncio.ensure_future(self._pump(c, fd, s)) for fd, s in zip(c.outputs, (STDOUT, STDERR))]
        c.exit_status = exit_code
        c.supervisor = asyncio.ensure_future(self._supervise(c, exit_code))

    async def start(self, container_id: str) -> None:
        c = self._live(container_id)
        async with c.lock:
            if c.state != STATE_CREATED:
                raise FailedPrecondition(f"container {c.id} is {c.state}, not created: cannot start it")
            with step_span("runtime_start", **{"container.id": c.id}):
                # taken before the call: a short-lived container may finish before runc start returns
                c.started_at = time.time_ns()
                try:
                    if not await self._start_by_fifo(c):
                        await self._runc_command("start", c.id, what=f"start container {c.id}")
                except BaseException:
                    if c.state == STATE_CREATED:
                        c.started_at = 0
                    raise
            if c.state == STATE_CREATED:
                c.state = STATE_RUNNING

    async def _start_by_fifo(self, c: _Container) -> bool:
        """What `runc start` does, without runc: read the init's "go" from the exec fifo to EOF
        (the init closes its end as it execs the process), then remove the fifo (runc state then
        says running). False when this container cannot be started so (`runc start` must)."""
        if not c.start_by_fifo:
            return False
        fifo = self._runc.runtime_root / c.id / "exec.fifo"
        try:
            # non-blocking: a reader open never waits; poll reports nothing until the init writes
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            data = await self._read_exec_fifo(c, fifo, fd)
        finally:
            os.close(fd)
        if not data:
            raise FailedPrecondition(f"start container {c.id}: its init exited before it was started")
        fifo.unlink(missing_ok=True)
        return True

    async def _read_exec_fifo(self, c: _Container, fifo: Path, fd: int) -> bytes:
        """The fifo's bytes up to EOF, or what is there once the init exited."""
        loop = asyncio.get_running_loop()
        data = b""
        while True:
            readable = asyncio.ensure_future(_ready(loop, fd, loop.add_reader, loop.remove_reader))
            exited = asyncio.ensure_future(c.exited.wait())
            try:
                await asyncio.wait_for(
                    asyncio.wait({readable, exited}, return_when=asyncio.FIRST_COMPLETED), _COMMAND_TIMEOUT
                )
            except TimeoutError:
                raise RuntimeCommandError(
                    ["read", str(fifo)],
                    f"the init of container {c.id} did not take the start within {_COMMAND_TIMEOUT:.0f}s",
                    what=f"start container {c.id}",
                ) from None
            finally:
                readable.cancel()
                exited.cancel()
            try:
                chunk = os.read(fd, 64)
            except BlockingIOError:
                if c.exited.is_set():
                    return data  # the init died without (all of) its "go"
                continue
            if not chunk:
                return data  # EOF: the init has written its byte and exec'd the process
            data += chunk

    async def kill(self, container_id: str, signal: int) -> None:
        if not 0 < signal < 65:
            raise InvalidArgument(f"signal {signal} is not a signal number (1-64)")
        c = self._containers.get(container_id)
        if c is None:
            if container_id in self._records:
                raise FailedPrecondition(f"container {container_id} is stopped: cannot signal it")
            raise self._not_found(container_id)
        if c.state == STATE_STOPPED:
            raise FailedPrecondition(f"container {c.id} is stopped: cannot signal it")
        with step_span("runtime_kill", **{"container.id": c.id, "signal": signal}):
            await self._runc_command("kill", c.id, str(signal), what=f"signal {signal} to container {c.id}")

    async def delete(self, container_id: str) -> None:
        """`runc delete --force` and forget the container (its exit record too); a missing one is fine."""
        cid = _check_id(container_id)
        c = self._containers.get(cid)
        if c is None:
            await self._delete(cid, None)
            return
        async with c.lock:
            await self._delete(cid, c)

    async def _delete(self, cid: str, c: _Container | None) -> None:
        with step_span("runtime_delete", **{"container.id": cid}):
            if c is not None:
                c.deleting = True
                if c.exit_status is not None and not c.exit_status.done():
                    # not reaped yet, so the pid is still our child: killed here, `runc delete
                    # --force` does not poll for it (in 100 ms steps)
                    try:
                        os.kill(c.pid, signal.SIGKILL)
                        await asyncio.wait_for(asyncio.shield(c.exited.wait()), _DELETE_EXIT_WAIT)
                    except (ProcessLookupError, TimeoutError):
                        pass
            await self._delete_quietly(cid, strict=True)
            if c is not None:
                if c.supervisor is not None and not c.supervisor.done():
                    try:
                        await asyncio.wait_for(asyncio.shield(c.supervisor), _DELETE_EXIT_WAIT)
                    except TimeoutError:
                        log.warning("container %s: its init %d did not exit after runc delete --force", cid, c.pid)
                await self._release(c)
                if self._containers.get(cid) is c:
                    del self._containers[cid]
                shutil.rmtree(c.handle.state_dir, ignore_errors=True)
            self._records.pop(cid, None)
            self._unreported.pop(cid, None)
            await asyncio.to_thread(durable.remove, self.exit_dir / f"{cid}.json")

    def state(self, container_id: str) -> monitor_pb2.ContainerState:
        c = self._containers.get(container_id)
        if c is not None:
            return _state_of(c)
        record = self._records.get(container_id)
        if record is not None:
            copy = monitor_pb2.ContainerState()
            copy.CopyFrom(record)
            return copy
        raise self._not_found(container_id)

    # -- exec --------------------------------------------------------------------------------

    async def exec_sync(self, req: monitor_pb2.ExecSyncRequest) -> monitor_pb2.ExecSyncResponse:
        c = self._running(req.container_id, "exec in it")
        if not req.cmd:
            raise InvalidArgument("exec needs a command")
        limit = req.output_limit if req.output_limit > 0 else EXEC_OUTPUT_LIMIT
        out, err = _Capture(limit), _Capture(limit)
        io = SessionIO(
            tty=False, stdin_enabled=False, stdout_enabled=True, stderr_enabled=True, stdout_sink=out, stderr_sink=err
        )
        loop = asyncio.get_running_loop()
        # the timeout is a client that goes away: streams_oci kills the exec'd tree and reaps it
        timer = loop.call_later(req.timeout, io.client_gone.set) if req.timeout > 0 else None
        try:
            with step_span("exec_wait", **{"container.id": c.id}):
                code = await streams_oci.exec_stream(self._runc, c.handle, list(req.cmd), io)
        finally:
            if timer is not None:
                timer.cancel()
        timed_out = io.client_gone.is_set()
        return monitor_pb2.ExecSyncResponse(
            exit_code=-1 if timed_out else code, stdout=bytes(out.data), stderr=bytes(err.data), timed_out=timed_out,
            stdout_truncated=out.truncated, stderr_truncated=err.truncated,
        )  # fmt: skip

    async def exec_stream(self, req: monitor_pb2.ServeExecRequest, io: SessionIO) -> int:
        c = self._running(req.container_id, "exec in it")
        return await streams_oci.exec_stream(self._runc, c.handle, list(req.cmd), io)

    # -- attach, terminal, log ---------------------------------------------------------------

    async def attach_stream(self, req: monitor_pb2.ServeAttachRequest, io: SessionIO) -> None:
        """The client gets the container's output from now on and feeds its stdin, until the
        output ends (the container exited), the client goes, or (as CRI-O) the client's stdin
        ends on a container that keeps its stdin open without a tty."""
        c = self._live(req.container_id)
        if c.state not in (STATE_CREATED, STATE_RUNNING):
            raise FailedPrecondition(f"container {c.id} is {c.state}, not running or created: cannot attach to it")
        subscriber = c.subscribe()
        output = asyncio.ensure_future(_attach_output(subscriber, io))
        gone = asyncio.ensure_future(io.client_gone.wait())
        tasks: list[asyncio.Future[Any]] = [output, gone]
        waits = {output, gone}
        try:
            if c.handle.terminal:
                tasks.append(asyncio.ensure_future(self._attach_resizes(c, io)))
            if io.stdin_enabled and c.handle.stdin:
                stdin = asyncio.ensure_future(self._attach_input(c, io))
                tasks.append(stdin)
                if not c.handle.stdin_once and not c.handle.terminal:
                    waits.add(stdin)  # stdin stays open for the next attach: this session ends here
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            c.subscribers.discard(subscriber)
            await _end_tasks(tasks)
            if io.stdin_enabled and c.handle.stdin_once and not c.handle.terminal and c.stdin >= 0:
                os.close(c.stdin)  # the first session's end closes the container's stdin (EOF for it)
                c.stdin = -1

    async def _attach_input(self, c: _Container, io: SessionIO) -> None:
        try:
            while chunk := await io.read_stdin():
                fd = c.master if c.handle.terminal else c.stdin
                if fd < 0:
                    return  # closed by an earlier session (stdin_once) or the container is gone
                await _write_fd(fd, chunk)
        except OSError as exc:  # EPIPE: the container closed its stdin or exited; EIO: the pty is gone
            log.debug("attach input to container %s ended: %s", c.id, exc)
            return
        if c.handle.stdin_once and not c.handle.terminal and c.stdin >= 0:
            os.close(c.stdin)  # the first session's EOF closes the container's stdin
            c.stdin = -1

    async def _attach_resizes(self, c: _Container, io: SessionIO) -> None:
        while True:
            size = await io.resizes.get()
            if c.master >= 0:
                _set_window_size(c.master, size.width, size.height)

    async def set_window_size(self, container_id: str, width: int, height: int) -> None:
        c = self._live(container_id)
        if not c.handle.terminal:
            raise FailedPrecondition(f"container {c.id} has no terminal: cannot resize it")
        if c.master < 0:
            raise FailedPrecondition(f"container {c.id}'s terminal is closed")
        _set_window_size(c.master, width, height)

    async def reopen_log(self, container_id: str) -> None:
        c = self._live(container_id)
        if c.state != STATE_RUNNING:
            raise FailedPrecondition(f"container {c.id} is {c.state}, not running: cannot reopen its log")
        try:
            c.log.reopen()
        except OSError as exc:
            raise FailedPrecondition(f"cannot reopen the log of container {c.id} at {c.log.path}: {exc.strerror}") from exc

    # -- exits -------------------------------------------------------------------------------

    async def watch_exits(self) -> AsyncIterator[monitor_pb2.ContainerState]:
        """Each exit: first those nobody has been told about, then each as it happens. An exit
        counts as told once the watcher asks for the next one (a watcher that breaks off before,
        its connection gone, leaves it for the next watcher: at least once)."""
        queue: asyncio.Queue[tuple[int, monitor_pb2.ContainerState] | None] = asyncio.Queue()
        self._watchers.add(queue)
        sent: set[int] = set()
        try:
            for seq, state in sorted(self._unreported.values(), key=lambda item: item[0]):
                sent.add(seq)
                yield state
                self._mark_reported(state.container_id, seq)
            while not self._closed:
                item = await queue.get()
                if item is None:
                    return
                seq, state = item
                if seq in sent:
                    continue
                yield state
                self._mark_reported(state.container_id, seq)
        finally:
            self._watchers.discard(queue)

    def _mark_reported(self, container_id: str, seq: int) -> None:
        current = self._unreported.get(container_id)
        if current is not None and current[0] == seq:
            del self._unreported[container_id]

    def _queue_exit(self, state: monitor_pb2.ContainerState) -> None:
        self._sequence += 1
        item = (self._sequence, state)
        self._unreported[state.container_id] = item
        for queue in self._watchers:
            queue.put_nowait(item)

    async def _supervise(self, c: _Container, exit_code: asyncio.Future[int]) -> None:
        """Wait for the init's exit, then record it and report it."""
        try:
            code = await exit_code
        except ChildProcessError as exc:
            code, c.message = -1, f"exit status lost: {exc}"
        finished_at = time.time_ns()
        if c.pumps:
            _, pending = await asyncio.wait(c.pumps, timeout=_DRAIN_WAIT)
            if pending:
                log.warning("container %s exited but its output is still open: not waiting for it", c.id)
        c.oom_killed = await asyncio.to_thread(_cgroup_oom_kills, c.handle.bundle) > 0
        c.exit_code, c.finished_at = code, finished_at
        c.started_at = min(c.started_at, finished_at)
        c.state = STATE_STOPPED
        c.exited.set()
        if c.deleting:
            return
        record = _ExitRecord(exit_code=code, finished_at=finished_at, oom_killed=c.oom_killed, started_at=c.started_at)
        try:
            await asyncio.to_thread(durable.write_atomic, self.exit_dir / f"{c.id}.json", json.dumps(record.__dict__))
        except OSError as exc:
            log.error("cannot record the exit of container %s (%s): reporting it anyway", c.id, exc)
        log.info("container %s exited with code %d%s", c.id, code, " (OOM killed)" if c.oom_killed else "")
        self._queue_exit(_state_of(c))

    # -- output ------------------------------------------------------------------------------

    async def _pump(self, c: _Container, fd: int, stream: bytes) -> None:
        """Copy one output stream of the container to its log and its attach sessions."""
        try:
            while data := await _read_fd(fd, _READ_BUFFER):
                try:
                    c.log.write(stream, data)
                except OSError as exc:
                    log.warning("cannot write the log of container %s: %s", c.id, exc)
                c.fan_out(stream, data)
        except OSError as exc:
            log.warning("reading the output of container %s failed: %s", c.id, exc)
        finally:
            if all(p.done() or p is asyncio.current_task() for p in c.pumps):
                c.output_done = True
                for subscriber in c.subscribers:
                    subscriber.put(_EOF)
                c.subscribers.clear()

    # -- shutdown ----------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop pumping and supervising, close every fd and log; the watchers' streams end."""
        self._closed = True
        for queue in self._watchers:
            queue.put_nowait(None)
        for c in list(self._containers.values()):
            await self._release(c)
        self._containers.clear()

    # -- helpers -----------------------------------------------------------------------------

    async def _release(self, c: _Container) -> None:
        tasks: list[asyncio.Future[Any]] = [t for t in (*c.pumps, c.supervisor) if t is not None]
        await _end_tasks(tasks)
        if c.exit_status is not None and not c.exit_status.done():
            c.exit_status.cancel()  # nobody will take the status any more (the reaper skips it)
        for subscriber in c.subscribers:
            subscriber.put(_EOF)
        c.subscribers.clear()
        c.output_done = True
        c.close_fds()
        c.log.close()

    async def _delete_quietly(self, container_id: str, strict: bool = False) -> None:
        """`runc delete --force`; a container runc does not know is fine. Errors are raised only
        when `strict` (after a failed create, the create error is the one that matters)."""
        try:
            await self._runc_command("delete", "--force", container_id, what=f"delete container {container_id}")
        except NotFound:
            pass
        except Exception as exc:
            if strict:
                raise
            log.warning("cleanup of container %s: %s", container_id, exc)

    async def _runc_command(self, *args: str, what: str) -> bytes:
        """Run a runc subcommand; its "no such container" / "wrong state" errors as CRI codes."""
        argv = [*self._runc._runc_prefix(), *args]
        log_command(argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise RuntimeCommandError(argv, str(exc), what=what) from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(), _COMMAND_TIMEOUT)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise RuntimeCommandError(argv, f"timed out after {_COMMAND_TIMEOUT:.0f}s", what=what) from None
        if proc.returncode == 0:
            return out
        detail = runtime_error_text(err)
        if any(hint in detail for hint in _NOT_FOUND_HINTS):
            raise NotFound(f"{what}: {self._runc.name}: {detail}")
        if any(hint in detail for hint in _PRECONDITION_HINTS):
            raise FailedPrecondition(f"{what}: {self._runc.name}: {detail}")
        raise RuntimeCommandError(argv, err, proc.returncode, what)

    def _live(self, container_id: str) -> _Container:
        c = self._containers.get(container_id)
        if c is not None:
            return c
        if container_id in self._records:
            raise FailedPrecondition(f"container {container_id} is stopped (it exited under an earlier monitor)")
        raise self._not_found(container_id)

    def _running(self, container_id: str, what: str) -> _Container:
        c = self._live(container_id)
        if c.state != STATE_RUNNING:
            raise FailedPrecondition(f"container {c.id} is {c.state}, not running: cannot {what}")
        return c

    def _runtime_status(self, container_id: str) -> RuntimeStatus:
        """For streams_oci (called from a worker thread: reads only)."""
        c = self._containers.get(container_id)
        if c is None:
            raise self._not_found(container_id)
        return RuntimeStatus(c.state, pid=c.pid, pid_start_time=c.pid_start_time, started_at=c.started_at)

    def _not_found(self, container_id: str) -> NotFound:
        return NotFound(f"container {container_id} not found in the monitor of pod {self.pod_id}")

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"the monitor of pod {self.pod_id} is shutting down")


# -- module helpers ----------------------------------------------------------------------------


def _check_id(container_id: str) -> str:
    if not container_id or "/" in container_id or container_id in (".", "..") or "\0" in container_id:
        raise InvalidArgument(f"invalid container id {container_id!r}")
    return container_id


def _state_of(c: _Container) -> monitor_pb2.ContainerState:
    state = monitor_pb2.ContainerState(container_id=c.id, state=c.state, started_at=c.started_at, message=c.message)
    if c.state == STATE_STOPPED:
        state.exited = True
        state.exit_code = c.exit_code
        state.finished_at = c.finished_at
        state.oom_killed = c.oom_killed
    else:
        state.pid = c.pid
        state.pid_start_time = c.pid_start_time
    return state


async def _attach_output(subscriber: _Subscriber, io: SessionIO) -> None:
    while (item := await subscriber.get()) is not None:
        stream, data = item
        try:
            if stream == STDERR:
                await io.write_stderr(data)
            else:
                await io.write_stdout(data)
        except ClientGone:
            return


def _console_socket(directory: Path) -> tuple[socket.socket, str | None]:
    """A listening socket for runc's --console-socket: in `directory` if the path fits in a
    socket address, else in a private temporary directory (returned, to be removed)."""
    own = None
    path = directory / "console.sock"
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        own = tempfile.mkdtemp(prefix="pycrio-console-")
        path = Path(own) / "console.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        path.unlink(missing_ok=True)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)
        raise
    return sock, own


async def _receive_console(listener: socket.socket) -> int:
    """The pty master runc sends (SCM_RIGHTS) over the console socket."""
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(listener)
    try:
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(conn, 4096, 1, socket.MSG_CMSG_CLOEXEC)
                break
            except BlockingIOError:
                await _ready(loop, conn.fileno(), loop.add_reader, loop.remove_reader)
    finally:
        conn.close()
    if not fds:
        raise OSError("runc sent no file descriptor")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


def _prepare_master(master: int) -> None:
    """Non-blocking, and ONLCR as conmon sets it ("to match kube settings": \\n -> \\r\\n)."""
    os.set_blocking(master, False)
    attrs = termios.tcgetattr(master)
    attrs[1] |= termios.ONLCR
    termios.tcsetattr(master, termios.TCSANOW, attrs)


def _set_window_size(master: int, width: int, height: int) -> None:
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _drain(fds: list[int]) -> bytes:
    """What is readable now on non-blocking `fds` (runc's error on the container's stderr)."""
    data = b""
    for fd in fds:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            data += chunk
    return data
