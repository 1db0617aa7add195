"""Streaming exec, attach and port-forward for the "oci" runtime (conmon + runc), on asyncio.

Everything here runs on the stream server's loop; what blocks (reading /proc, setns) goes to a
thread. The client's side of a session is a `SessionIO`.

- exec: `runc exec` of the command, as CRI-O does. Without a tty runc's stdin/stdout/stderr are
  pipes of ours (stdin /dev/null unless asked for), copied with back-pressure; the client's stdin
  EOF closes the stdin pipe. (runc relays them through pipes of its own and exits only once the
  command's output is closed by all its holders: a background child that keeps it keeps the
  session, as with CRI-O.) With a tty runc is not detached: it gets a pty of ours as its own stdio
  and copies between it and the container's pty (runc 1.1 takes `--console-socket` only with
  `--detach`, and a detached exec's process is reparented away from us, its exit code lost).
  The first terminal size goes into the process spec's `consoleSize` (set before the process
  runs: no race with `stty size`); later ones resize our pty and SIGWINCH makes runc copy them.
- attach: conmon's attach socket `<bundle>/attach` (SOCK_SEQPACKET; with --full-attach conmon
  binds it in the bundle). Each packet from conmon is one pipe byte (2 stdout, 3 stderr) and
  the data; what we send goes to the container's stdin; our shutdown(SHUT_WR) makes conmon
  close that stdin unless it runs with --leave-stdin-open (stdin_once). Resizes go to the ctl
  fifo `<bundle>/ctl` as "1 <height> <width>\\n". conmon closes the socket once the container's
  process exited and its output is drained.
- port-forward: a TCP connection to 127.0.0.1 (then ::1) in the pod's network namespace: the
  sockets are created in a short-lived thread that entered the namespace (a socket stays in the
  namespace it was created in), then connected from the loop.

A client that goes away while its exec runs gets the exec's processes killed at once (SIGKILL,
descendants before their parents so the parents reap them, then the exec'd process, which runc
reaps): nothing is left to read what a graceful exit would print, and signalling only the
leader would leave its children running in the container. ExecSync's timeout does the same.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import termios
import threading
import tty as ttymode
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from pycrio.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from pycrio.oci.runtime import (
    STATE_CREATED,
    STATE_RUNNING,
    ContainerHandle,
    RuntimeCommandError,
    log,
    log_command,
)
from pycrio.oci.runtime_oci import (
    _EXEC_REAP_WAIT,
    _exists,
    _Paths,
    _ppid,
    _process_tree,
    _read_int,
    _signal_pid,
    _wait_for,
)
from pycrio.streaming.session import ClientGone, SessionIO, TerminalSize

if TYPE_CHECKING:
    from pycrio.oci.runtime_oci import OCIRuntime

_CHUNK = 32 * 1024
_DRAIN_WAIT = 2.0  # after the process exited: how long its output may still trickle in
_FIRST_SIZE_WAIT = 0.05  # a tty client sends its size right after opening; wait that long for it
_PIDFILE_WAIT = 5.0  # runc writes the exec pid file just after starting the process
_RUNC_EXIT_WAIT = 5.0  # runc exits once the exec'd process is reaped
_EOT = b"\x04"  # VEOF: what a terminal sends for ^D

# conmon's attach socket (conmon src/utils.h stdpipe_t; config.h STDIO_BUF_SIZE, CONN_SOCK_BUF_SIZE)
_ATTACH_STDOUT = 2
_ATTACH_STDERR = 3
_ATTACH_RECV = 64 * 1024  # above conmon's 8192 + 1 byte packets: a short buffer truncates a packet
_ATTACH_SEND = 8192  # conmon reads stdin packets into 32 KiB and drops the rest of a longer one
_RESIZE_EVENT = 1  # conmon's ctl fifo: "<type> <height> <width>\n", type 1 = terminal resize

_DIAL_TIMEOUT = 10.0
_CLONE_NEWNET = 0x40000000
_libc: ctypes.CDLL | None = None


# -- exec ----------------------------------------------------------------------------------


async def exec_stream(runtime: "OCIRuntime", handle: ContainerHandle, cmd: list[str], io: SessionIO) -> int:
    """Run `cmd` in the running container with the client's streams; its exit code (a signal
    n is 128 + n, as runc and shells report it)."""
    if not cmd:
        raise InvalidArgument("exec needs a command")
    await _require_running(runtime, handle, "exec in it")
    token = uuid.uuid4().hex
    pidfile = handle.state_dir / f"exec-{token}.pid"
    process_file = handle.state_dir / f"exec-{token}.json"
    argv = [*runtime._runc_prefix(), "exec", "--pid-file", str(pidfile)]
    try:
        if io.tty:
            size = await _first_size(io)
            if size is not None:
                # the size must be there before the process runs: runc's own resize comes later
                await asyncio.to_thread(_write_process_file, handle, cmd, size, process_file)
                argv += ["--process", str(process_file), handle.id]
            else:
                argv += ["--tty", handle.id, *cmd]
            return await _TtyExec(argv, pidfile, io, size).run()
        return await _PipeExec([*argv, handle.id, *cmd], pidfile, io).run()
    finally:
        pidfile.unlink(missing_ok=True)
        process_file.unlink(missing_ok=True)


class _Exec:
    """One `runc exec` and the tasks copying its streams; `run()` returns its exit code once it
    exited (killed if the client went away) and its output was copied."""

    def __init__(self, argv: list[str], pidfile: Path, io: SessionIO) -> None:
        self.argv = argv
        self.pidfile = pidfile
        self.io = io
        self.proc: asyncio.subprocess.Process | None = None
        self.exited = asyncio.Event()
        self.tasks: list[asyncio.Future[Any]] = []

    async def spawn(self) -> asyncio.subprocess.Process:
        raise NotImplementedError

    def output_tasks(self) -> list[Awaitable[None]]:
        raise NotImplementedError

    def input_tasks(self) -> list[Awaitable[None]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what spawn() opened."""

    async def run(self) -> int:
        try:
            log_command(self.argv)
            try:
                self.proc = await self.spawn()
            except OSError as exc:  # runc missing, out of fds or processes
                raise RuntimeCommandError(self.argv, str(exc), what="exec") from exc
            outputs = [asyncio.ensure_future(t) for t in self.output_tasks()]
            inputs = [asyncio.ensure_future(t) for t in self.input_tasks()]
            self.tasks = [*outputs, *inputs]
            wait = asyncio.ensure_future(self.proc.wait())
            gone = asyncio.ensure_future(self.io.client_gone.wait())
            try:
                await asyncio.wait({wait, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not wait.done():
                log.info("exec client gone: killing `%s`", self.argv[-1])
                await asyncio.to_thread(_kill_exec, self.pidfile, self.proc.pid)
                await self._reap(wait)
            self.exited.set()
            if outputs:
                await asyncio.wait(outputs)
            return _exit_code(wait.result())
        except BaseException:
            if self.proc is not None and self.proc.returncode is None:
                # cancelled (the server stops) or failed: the exec must not outlive the session
                await asyncio.shield(self._abort())
            raise
        finally:
            await _end_tasks(self.tasks)
            self.close()

    async def _reap(self, wait: "asyncio.Future[int]") -> None:
        assert self.proc is not None
        try:
            await asyncio.wait_for(asyncio.shield(wait), _RUNC_EXIT_WAIT)
        except TimeoutError:
            log.warning("runc exec %d did not exit after its process was killed: killing it", self.proc.pid)
            _signal_group(self.proc.pid, signal.SIGKILL)
            await wait

    async def _abort(self) -> None:
        assert self.proc is not None
        await asyncio.to_thread(_kill_exec, self.pidfile, self.proc.pid)
        await self._reap(asyncio.ensure_future(self.proc.wait()))

    async def copy_out(self, fd: int, write: Callable[[bytes], Awaitable[None]]) -> None:
        while chunk := await self.after_exit(_read_fd(fd, _CHUNK)):
            try:
                await write(chunk)
            except ClientGone:
                return

    async def after_exit(self, read: Awaitable[bytes]) -> bytes:
        """`read` while the process runs; once it exited, its output may trickle in only for
        _DRAIN_WAIT more (runc is gone then: only a stray holder of our end could keep it open)."""
        future = asyncio.ensure_future(read)
        if not self.exited.is_set():
            exited = asyncio.ensure_future(self.exited.wait())
            try:
                await asyncio.wait({future, exited}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                exited.cancel()
        if not future.done():
            try:
                return await asyncio.wait_for(future, _DRAIN_WAIT)
            except TimeoutError:
                return b""
        return future.result()


class _PipeExec(_Exec):
    """No tty: pipes of ours for the streams the client asked for, /dev/null for the others
    (plain fds: closing them at the end does not depend on the command's background children)."""

    def __init__(self, argv: list[str], pidfile: Path, io: SessionIO) -> None:
        super().__init__(argv, pidfile, io)
        self.stdin = self.stdout = self.stderr = -1

    async def spawn(self) -> asyncio.subprocess.Process:
        null = asyncio.subprocess.DEVNULL
        child: list[int] = []
        try:
            ends = {}
            for name, enabled, ours in (("stdin", self.io.stdin_enabled, 1), ("stdout", self.io.stdout_enabled, 0),
                                        ("stderr", self.io.stderr_enabled, 0)):  # fmt: skip
                if not enabled:
                    ends[name] = null
                    continue
                pipe = os.pipe()
                child.append(pipe[1 - ours])
                ends[name] = pipe[1 - ours]
                os.set_blocking(pipe[ours], False)
                setattr(self, name, pipe[ours])
            return await asyncio.create_subprocess_exec(
                *self.argv, **ends, start_new_session=True  # the daemon's signals are not the exec's
            )
        finally:
            for fd in child:
                os.close(fd)  # runc and the command hold them now

    def output_tasks(self) -> list[Awaitable[None]]:
        tasks = []
        if self.stdout >= 0:
            tasks.append(self.copy_out(self.stdout, self.io.write_stdout))
        if self.stderr >= 0:
            tasks.append(self.copy_out(self.stderr, self.io.write_stderr))
        return tasks

    def input_tasks(self) -> list[Awaitable[None]]:
        return [self._copy_in()] if self.stdin >= 0 else []

    def close(self) -> None:
        for name in ("stdin", "stdout", "stderr"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    async def _copy_in(self) -> None:
        try:
            while chunk := await self.io.read_stdin():
                await _write_fd(self.stdin, chunk)
        except BrokenPipeError:
            pass  # the command closed its stdin or exited: the rest of the input has no reader
        finally:
            os.close(self.stdin)  # EOF for the command (`echo hi | crictl exec -i c cat` ends)
            self.stdin = -1


class _TtyExec(_Exec):
    """With a tty: runc's stdio is our pty (raw), runc copies it to and from the container's."""

    def __init__(self, argv: list[str], pidfile: Path, io: SessionIO, size: TerminalSize | None) -> None:
        super().__init__(argv, pidfile, io)
        self.size = size
        self.master = -1

    async def spawn(self) -> asyncio.subprocess.Process:
        master, slave = os.openpty()
        try:
            # runc makes it raw too, but only once the process runs: input before must not be cooked
            ttymode.setraw(slave)
            if self.size is not None:
                _set_size(master, self.size)
            os.set_blocking(master, False)
            self.master = master
            return await asyncio.create_subprocess_exec(
                *self.argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
            )
        finally:
            os.close(slave)  # runc holds it now: its exit is our EOF (EIO) on the master

    def output_tasks(self) -> list[Awaitable[None]]:
        return [self.copy_out(self.master, self.io.write_stdout)]

    def input_tasks(self) -> list[Awaitable[None]]:
        tasks = [self._resize()]
        if self.io.stdin_enabled:
            tasks.append(self._copy_in())
        return tasks

    def close(self) -> None:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    async def _copy_in(self) -> None:
        last = b"\n"
        try:
            while chunk := await self.io.read_stdin():
                await _write_fd(self.master, chunk)
                last = chunk[-1:]
            if not self.io.client_gone.is_set():
                # A terminal has no half-close: end the input as a user would, with ^D (twice
                # after a partial line: the first one only hands the line to the reader).
                await _write_fd(self.master, _EOT if last in (b"\n", b"\r") else _EOT * 2)
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EBADF):
                raise

    async def _resize(self) -> None:
        while True:
            size = await self.io.resizes.get()
            if size == self.size:
                continue
            self.size = size
            _set_size(self.master, size)
            assert self.proc is not None
            if self.proc.returncode is None:
                _signal_pid(self.proc.pid, signal.SIGWINCH)  # runc copies our size to the container's pty


async def _first_size(io: SessionIO) -> TerminalSize | None:
    """The terminal size the client sent first, if it sends one at once; the newest queued wins."""
    size = None
    try:
        size = await asyncio.wait_for(io.resizes.get(), _FIRST_SIZE_WAIT)
    except TimeoutError:
        return None
    while not io.resizes.empty():
        size = io.resizes.get_nowait()
    return size


def _write_process_file(handle: ContainerHandle, cmd: list[str], size: TerminalSize, path: Path) -> None:
    """`runc exec --process`: the container's process with our args, a terminal and its size
    (runc's own exec flags build the same from config.json, without the size)."""
    spec = json.loads((handle.bundle / "config.json").read_text())
    process: dict[str, Any] = dict(spec.get("process") or {})
    process.update(args=list(cmd), terminal=True, consoleSize={"height": size.height, "width": size.width})
    # it holds the container's environment: for root's eyes only, like config.json's directory
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(process))


def _exit_code(returncode: int) -> int:
    """runc reports a signalled process as 128 + n itself; runc killed by n is -n here."""
    return 128 - returncode if returncode < 0 else returncode


def _kill_exec(pidfile: Path, runc_pid: int) -> None:
    """Kill the exec'd process and its descendants (runc's child: runc reaps it and exits).
    Blocking: polls /proc."""
    _wait_for(lambda: _read_int(pidfile) or not _exists(runc_pid), _PIDFILE_WAIT)
    exec_pid = _read_int(pidfile)
    if not exec_pid or _ppid(exec_pid) != runc_pid:
        # not started (or already gone): without runc nothing more will start
        _signal_group(runc_pid, signal.SIGKILL)
        return
    tree = _process_tree(exec_pid)
    descendants = tree[1:]
    for pid in descendants:
        _signal_pid(pid, signal.SIGKILL)
    _wait_for(lambda: not any(_exists(pid) for pid in descendants), _EXEC_REAP_WAIT if descendants else 0.0)
    _signal_pid(exec_pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _set_size(fd: int, size: TerminalSize) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.height, size.width, 0, 0))


async def _read_fd(fd: int, size: int) -> bytes:
    """Read from a non-blocking fd on the loop; b"" at EOF (EIO: a pty's other side closed)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise
        await _ready(loop, fd, loop.add_reader, loop.remove_reader)


async def _write_fd(fd: int, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
            continue
        except BlockingIOError:
            pass
        await _ready(loop, fd, loop.add_writer, loop.remove_writer)


async def _ready(
    loop: asyncio.AbstractEventLoop, fd: int, add: Callable[..., None], remove: Callable[[int], Any]
) -> None:
    future = loop.create_future()
    add(fd, lambda: future.done() or future.set_result(None))
    try:
        await future
    finally:
        remove(fd)


# -- attach --------------------------------------------------------------------------------


async def attach_stream(runtime: "OCIRuntime", handle: ContainerHandle, io: SessionIO) -> None:
    """Connect the client to the container's stdio through conmon until the container's output
    ends (it exited), the client goes, or (as CRI-O) the client's stdin ends on a container that
    keeps its stdin open without a tty."""
    # conmon listens from create on (CRI-O attaches to created containers too)
    await _require_running(runtime, handle, "attach to it", (STATE_RUNNING, STATE_CREATED))
    paths = _Paths(handle)
    sock = await _connect_attach(handle, paths.handle.bundle / "attach")
    ctl = _open_ctl(handle, paths.ctl_fifo) if io.tty and handle.terminal else -1
    loop = asyncio.get_running_loop()
    output = asyncio.ensure_future(_attach_output(loop, sock, io))
    gone = asyncio.ensure_future(io.client_gone.wait())
    tasks: list[asyncio.Future[Any]] = [output, gone]
    waits = {output, gone}
    try:
        if ctl >= 0:
            tasks.append(asyncio.ensure_future(_attach_resizes(ctl, io)))
        if io.stdin_enabled:
            stdin = asyncio.ensure_future(_attach_input(loop, sock, io))
            tasks.append(stdin)
            if handle.stdin and not handle.stdin_once and not io.tty:
                waits.add(stdin)  # stdin stays open for the next attach: this session ends here
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await _end_tasks(tasks)
        sock.close()
        if ctl >= 0:
            os.close(ctl)


async def _connect_attach(handle: ContainerHandle, path: Path) -> socket.socket:
    """Connect to conmon's attach socket, through /proc/self/fd: the bundle path can be longer
    than a socket address allows."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        directory = os.open(path.parent, os.O_PATH | os.O_CLOEXEC)
        try:
            await loop.sock_connect(sock, f"/proc/self/fd/{directory}/{path.name}")
        finally:
            os.close(directory)
    except OSError as exc:
        sock.close()
        raise FailedPrecondition(
            f"cannot attach to container {handle.id}: its conmon attach socket {path} is not there "
            f"({exc.strerror or exc})"
        ) from exc
    return sock


def _open_ctl(handle: ContainerHandle, path: Path) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:  # ENXIO: no reader (conmon gone); ENOENT: never ran
        raise FailedPrecondition(
            f"cannot attach to container {handle.id}: its conmon control fifo {path} is not open ({exc.strerror})"
        ) from exc


async def _attach_output(loop: asyncio.AbstractEventLoop, sock: socket.socket, io: SessionIO) -> None:
    while True:
        try:
            packet = await loop.sock_recv(sock, _ATTACH_RECV)
        except ConnectionResetError:
            return
        if not packet:
            return  # conmon closed it: the container's process exited and its output is out
        pipe, data = packet[0], packet[1:]
        try:
            if pipe == _ATTACH_STDOUT:
                await io.write_stdout(data)
            elif pipe == _ATTACH_STDERR:
                await io.write_stderr(data)
        except ClientGone:
            return


async def _attach_input(loop: asyncio.AbstractEventLoop, sock: socket.socket, io: SessionIO) -> None:
    try:
        while chunk := await io.read_stdin():
            for start in range(0, len(chunk), _ATTACH_SEND):
                await loop.sock_sendall(sock, chunk[start : start + _ATTACH_SEND])
        if not io.client_gone.is_set():
            sock.shutdown(socket.SHUT_WR)  # conmon closes the container's stdin unless told to leave it
    except (BrokenPipeError, ConnectionResetError):
        pass


async def _attach_resizes(ctl: int, io: SessionIO) -> None:
    while True:
        size = await io.resizes.get()
        try:
            os.write(ctl, f"{_RESIZE_EVENT} {size.height} {size.width}\n".encode())
        except BlockingIOError:
            log.warning("conmon's control fifo is full: a terminal resize was dropped")
        except OSError as exc:  # EPIPE: conmon is gone, the session ends with the output
            log.debug("terminal resize not sent: %s", exc)
            return


# -- port-forward --------------------------------------------------------------------------


async def dial_port(netns_path: str | None, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to `port` on localhost (127.0.0.1, then ::1) in the network namespace
    pinned at `netns_path` (None: the daemon's own)."""
    if not 0 < port < 65536:
        raise InvalidArgument(f"port {port} is out of range (1-65535)")
    where = f"in the pod's network namespace {netns_path}" if netns_path else "on the host"
    if netns_path is None:
        sockets = _localhost_sockets(port)
    else:
        sockets = await _in_netns(netns_path, lambda: _localhost_sockets(port))
    failures = []
    loop = asyncio.get_running_loop()
    for index, (sock, address) in enumerate(sockets):
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), _DIAL_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            sock.close()
            reason = "timed out" if isinstance(exc, TimeoutError) else _reason(exc)
            failures.append(f"{_format_address(address)}: {reason}")
            continue
        for other, _ in sockets[index + 1 :]:
            other.close()
        return await asyncio.open_connection(sock=sock)
    raise Unavailable(f"cannot connect to port {port} {where}: {'; '.join(failures) or 'no loopback address'}")


def _localhost_sockets(port: int) -> list[tuple[socket.socket, tuple[Any, ...]]]:
    """Non-blocking TCP sockets for 127.0.0.1 and ::1 (an IPv4-only host has only the first)."""
    result: list[tuple[socket.socket, tuple[Any, ...]]] = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError:
            continue  # EAFNOSUPPORT: IPv6 is off
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # relayed bytes go out as they come
        result.append((sock, (host, port)))
    return result


def _reason(exc: OSError) -> str:
    # asyncio's sock_connect words its errors "Connect call failed (...)": the errno says it better
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


def _format_address(address: tuple[Any, ...]) -> str:
    return f"[{address[0]}]" if ":" in address[0] else str(address[0])


async def _in_netns(netns_path: str, make: Callable[[], Any]) -> Any:
    """Run `make()` (quick, non-blocking) in the network namespace at `netns_path`, in a thread of
    its own that enters it and ends afterwards (no thread ever stays in the pod's namespace)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def report(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def enter_and_make() -> None:
        result, error = None, None
        try:
            result = _call_in_netns(netns_path, make)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop
            error = exc
        loop.call_soon_threadsafe(report, result, error)

    threading.Thread(target=enter_and_make, name="netns-dial", daemon=True).start()
    return await future


def _call_in_netns(netns_path: str, make: Callable[[], Any]) -> Any:
    try:
        target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFound(f"the pod's network namespace {netns_path} is gone") from exc
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, f"cannot enter the network namespace {netns_path}")
            try:
                return make()
            finally:
                # if this fails the thread still ends right after: nothing else runs in it
                _setns(own, "cannot return to the daemon's network namespace")
        finally:
            os.close(own)
    finally:
        os.close(target)


def _setns(fd: int, what: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise FailedPrecondition(f"{what}: {os.strerror(code)}")


# -- shared --------------------------------------------------------------------------------


async def _end_tasks(tasks: list[asyncio.Future[Any]]) -> None:
    """Cancel a session's tasks, wait for them, and log what failed in them."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.warning("stream session task failed: %r", task.exception())


async def _require_running(
    runtime: "OCIRuntime", handle: ContainerHandle, what: str, states: tuple[str, ...] = (STATE_RUNNING,)
) -> None:
    status = await asyncio.to_thread(runtime.status, handle)
    if status.state not in states:
        raise FailedPrecondition(f"container {handle.id} is {status.state}, not {' or '.join(states)}: cannot {what}")
