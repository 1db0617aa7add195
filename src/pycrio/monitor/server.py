"""The monitor's unix socket: one asyncio task per connection, requests answered in order.

A connection carries Request/Response frames (pycrio.monitor.framing). A stream request
(WatchExits, ServeExec, ServeAttach) turns its connection into that stream's: after the Response
both sides exchange StreamFrames until one closes, then the connection ends. A connection that
sends something that is not a frame gets an INVALID_ARGUMENT answer and is closed; the others
and the server go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path

from pycrio.monitor import framing
from pycrio.monitor import monitor_pb2 as pb
from pycrio.monitor.rpc import INVALID_ARGUMENT, STREAM_OPS, MonitorRPC, error_response
from pycrio.streaming.session import ClientGone, SessionIO, Sink, TerminalSize

log = logging.getLogger("pycrio.monitor")

SOCKET_MODE = 0o600
MAX_SUN_PATH = 107  # sockaddr_un.sun_path is 108 bytes with its NUL


class ServerError(Exception):
    """The socket cannot be served (path taken by a live monitor, not a socket, cannot bind)."""


def _connectable(path: Path) -> bool:
    """Whether something accepts connections on the unix socket at `path` (a live monitor)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(_sun_path(path)[0])
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _sun_path(path: Path) -> tuple[str, int | None]:
    """An address for `path` that fits sun_path: itself, or /proc/self/fd/<dir fd>/<name> (the
    caller closes the returned directory fd), as conmon-rs's bind_long_path does."""
    text = os.fspath(path)
    if len(os.fsencode(text)) <= MAX_SUN_PATH:
        return text, None
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    short = f"/proc/self/fd/{dir_fd}/{path.name}"
    if len(short) > MAX_SUN_PATH:
        os.close(dir_fd)
        raise ServerError(f"socket name {path.name!r} is too long for a unix socket")
    return short, dir_fd


def bind_socket(path: Path) -> socket.socket:
    """A listening socket at `path`, mode 0600; a stale socket file is replaced, a live one refused."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise ServerError(f"{path} exists and is not a socket")
        if _connectable(path):
            raise ServerError(f"{path}: another process already serves this socket")
        path.unlink()  # left by a monitor that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    address, dir_fd = _sun_path(path)
    old_umask = os.umask(0o177)  # never visible with wider permissions, not even between bind and chmod
    try:
        sock.bind(address)
        os.chmod(path, SOCKET_MODE)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENOENT:
            raise ServerError(f"cannot bind {path}: its directory {path.parent} does not exist") from exc
        raise ServerError(f"cannot bind {path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old_umask)
        if dir_fd is not None:
            os.close(dir_fd)
    sock.setblocking(False)
    return sock


class Connection:
    """One client connection once it became a stream (rpc.Stream)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._pump: asyncio.Task[None] | None = None

    async def respond(self, response: pb.Response) -> None:
        await framing.write_async(self.writer, response)

    async def send(self, frame: pb.StreamFrame) -> None:
        await framing.write_async(self.writer, frame)

    def session_io(self, tty: bool, stdin: bool, stdout: bool, stderr: bool) -> SessionIO:
        """The session's SessionIO: frames from the daemon feed it, what it writes goes out as frames."""
        io = SessionIO(tty=tty, stdin_enabled=stdin, stdout_enabled=stdout, stderr_enabled=stderr)

        def sink(kind: str) -> Sink:
            async def write(data: bytes) -> None:
                try:
                    await framing.write_async(self.writer, pb.StreamFrame(**{kind: data}))
                except ConnectionError as exc:
                    io.client_gone.set()
                    raise ClientGone(f"the daemon closed the {kind} stream") from exc

            return write

        if stdout:
            io.stdout_sink = sink("stdout")
        if stderr and not tty:
            io.stderr_sink = sink("stderr")
        self._pump = asyncio.ensure_future(self._feed(io))
        return io

    async def _feed(self, io: SessionIO) -> None:
        """Frames from the daemon into `io` until it closes; then the client is gone."""
        try:
            while True:
                frame = await framing.read_async(self.reader, pb.StreamFrame)
                if frame is None:
                    break
                kind = frame.WhichOneof("frame")
                if kind == "stdin" and io.stdin_enabled and frame.stdin:
                    io.feed_stdin(frame.stdin)
                elif kind == "stdin_eof" and io.stdin_enabled:
                    io.feed_stdin(b"")
                elif kind == "resize":
                    io.resizes.put_nowait(TerminalSize(frame.resize.width, frame.resize.height))
        except (ConnectionError, framing.FrameError) as exc:
            log.debug("stream from the daemon ended: %s", exc)
        finally:
            io.client_gone.set()

    async def wait_closed(self) -> None:
        """Until the daemon closes its side (what it sends meanwhile is not for this stream)."""
        if self._pump is not None:
            await asyncio.shield(self._pump)
            return
        with contextlib.suppress(ConnectionError, framing.FrameError):
            while await framing.read_async(self.reader, pb.StreamFrame) is not None:
                pass

    def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()



class MonitorServer:
    """Serves `rpc` on the unix socket at `path` until `stop` (Shutdown, a signal)."""

    def __init__(self, path: Path, rpc: MonitorRPC) -> None:
        self.path = path
        self.rpc = rpc
        self.stop_reason = ""
        self._stopped = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._sock: socket.socket | None = None

    def bind(self) -> None:
        """Create the socket file now (before readiness is reported); serving starts in `serve`."""
        self._sock = bind_socket(self.path)

    async def serve(self) -> str:
        """Accept connections until `stop`; returns why it stopped."""
        if self._sock is None:
            self.bind()
        self._server = await asyncio.start_unix_server(self._serve_connection, sock=self._sock)
        await self._stopped.wait()
        return self.stop_reason

    def stop(self, reason: str) -> None:
        if not self._stopped.is_set():
            self.stop_reason = reason
            self._stopped.set()

    async def close(self) -> None:
        """Stop accepting, drop the connections (nothing is waited for) and remove the socket file."""
        if self._server is not None:
            self._server.close()
        elif self._sock is not None:
            self._sock.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=1.0)
        if self._sock is not None:  # ours: a socket this monitor could not bind belongs to another
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        connection: Connection | None = None
        try:
            while not self._stopped.is_set():
                try:
                    request = await framing.read_async(reader, pb.Request)
                except framing.FrameError as exc:
                    log.warning("closing a connection that sent a malformed request: %s", exc)
                    with contextlib.suppress(ConnectionError):
                        await framing.write_async(writer, error_response(INVALID_ARGUMENT, f"malformed request: {exc}"))
                    break
                if request is None:
                    break
                op = self.rpc.operation(request)
                if op in STREAM_OPS:
                    connection = Connection(reader, writer)
                    await self.rpc.stream(request, connection)
                    break
                response = await self.rpc.call(request)
                await framing.write_async(writer, response)
                if op == "shutdown" and response.code == 0:
                    self.stop("shutdown requested")
                    break
        except ConnectionError as exc:
            log.debug("connection ended: %s", exc)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one connection's bug must not stop the monitor
            log.exception("connection failed")
        finally:
            if connection is not None:
                connection.close()
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
