"""The Kubernetes remote command protocols (exec, attach) over SPDY streams or WebSocket channels.

Facts from k8s.io/cri-streaming@v0.37.2 pkg/streaming/remotecommand (the server CRI-O and
containerd embed) and k8s.io/client-go@v0.37.2 tools/remotecommand (what crictl and kubectl run):

- SPDY: the client opens one stream per `streamType` header (error, stdin, stdout, stderr, and
  resize with a tty from v3 on) and the server waits, up to the stream creation timeout, for as
  many as the request asks for. v1/v2 have no resize stream. The error stream carries the outcome:
  v1..v3 the failure's message as text (nothing on success), v4 (and v5) a JSON `Status`.
  The client reads stdout/stderr and the error stream to EOF, so each is half-closed at the end.
- WebSocket: one message per write, its first byte the channel (0 stdin, 1 stdout, 2 stderr,
  3 error, 4 resize); the base64 subprotocols send text, the channel as an ASCII digit and the
  payload base64. v5 adds the client's half-close: the message [255, channel]. The server writes
  an empty message on the first output channel as it opens. The client's readers end only when the
  connection closes, so the server closes it after the status.
- Resize: a stream of JSON objects {"Width": w, "Height": h} (decoded as Go does: field names in
  any case, uint16 values; the first undecodable value ends resize handling).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

from pycrio.streaming.session import ClientGone, ExecOutcome, SessionIO, Sink, TerminalSize

if TYPE_CHECKING:  # the transports and the request live in server.py (the HTTP side)
    from pycrio.streaming.server import SpdyTransport, StreamRequest, WebSocketTransport

log = logging.getLogger("pycrio.streaming")

DEFAULT_STREAM_CREATION_TIMEOUT = 30.0

STREAM_TYPE_HEADER = "streamtype"  # SPDY header names arrive lower-cased
STREAM_ERROR, STREAM_STDIN, STREAM_STDOUT, STREAM_STDERR, STREAM_RESIZE = (
    "error", "stdin", "stdout", "stderr", "resize")

CHANNEL_STDIN, CHANNEL_STDOUT, CHANNEL_STDERR, CHANNEL_ERROR, CHANNEL_RESIZE = range(5)
CHANNEL_CLOSE = 255  # v5: [255, channel] is the client's half-close of that channel

NON_ZERO_EXIT_CODE_REASON = "NonZeroExitCode"
EXIT_CODE_CAUSE_TYPE = "ExitCode"

# SPDY RST_STREAM status for a stream we do not take
_REFUSED_STREAM = 3
# stdin chunks queued for the runtime before we stop reading the client (its flow control then
# holds the client back)
_STDIN_QUEUE_LIMIT = 32


def _spdy_version(protocol: str) -> int:
    """The remotecommand version of a negotiated SPDY subprotocol ("" = v1)."""
    if protocol.startswith("v") and protocol.endswith(".channel.k8s.io"):
        try:
            return int(protocol[1:protocol.index(".")])
        except ValueError:
            return 1
    return 1


def exec_status(kind: str, cmd: tuple[str, ...] | list[str], outcome: ExecOutcome) -> dict[str, Any]:
    """The Status k8s writes for an exec or attach outcome (field order as Go marshals it)."""
    if outcome.error:
        what = "error attaching to container" if kind == "attach" else "error executing command in container"
        return {"status": "Failure", "message": f"Internal error occurred: {what}: {outcome.error}",
                "reason": "InternalError", "code": 500}
    code = outcome.exit_code
    if kind != "attach" and code:
        # the inner text is containerd's (its exec error); the rest is cri-streaming's
        inner = f"error executing command [{' '.join(cmd)}], exit code {code}"
        return {"status": "Failure",
                "message": f"command terminated with non-zero exit code: {inner}",
                "reason": NON_ZERO_EXIT_CODE_REASON,
                "details": {"causes": [{"reason": EXIT_CODE_CAUSE_TYPE, "message": str(code)}]}}
    return {"status": "Success"}


def encode_status(status: dict[str, Any], json_status: bool) -> bytes:
    """What goes on the error stream: v4+ the JSON Status, before v4 a failure's message only."""
    if json_status:
        return json.dumps(status, separators=(",", ":")).encode()
    if status.get("status") == "Success":
        return b""
    return str(status.get("message", "")).encode()


class ResizeDecoder:
    """Decodes the resize stream's concatenated JSON objects into TerminalSizes."""

    def __init__(self) -> None:
        self._buf = ""
        self._raw = b""
        self._decoder = json.JSONDecoder()
        self.failed = False

    def feed(self, data: bytes) -> Iterator[TerminalSize]:
        if self.failed:
            return
        self._raw += data
        try:
            text = self._raw.decode()
        except UnicodeDecodeError as exc:
            if exc.start < len(self._raw) - 3:  # not just a split multi-byte character
                self._fail("not UTF-8")
            return
        self._raw = b""
        self._buf += text
        while True:
            doc = self._buf.lstrip()
            if not doc:
                self._buf = ""
                return
            try:
                value, end = self._decoder.raw_decode(doc)
            except json.JSONDecodeError as exc:
                if exc.pos >= len(doc) or exc.msg.startswith("Unterminated"):
                    self._buf = doc  # incomplete: wait for more
                    if len(doc) > 4096:
                        self._fail("oversized")
                    return
                self._fail(exc.msg)
                return
            if end == len(doc) and not isinstance(value, (dict, list, str)):
                # a bare number or literal at the end of the buffer may still be growing
                self._buf = doc
                return
            self._buf = doc[end:]
            size = self._size(value)
            if size is None:
                self._fail(f"not a terminal size: {value!r}")
                return
            yield size

    def _size(self, value: Any) -> TerminalSize | None:
        if value is None:
            return TerminalSize(0, 0)
        if not isinstance(value, dict):
            return None
        dims = {"width": 0, "height": 0}
        for key, v in value.items():
            name = key.lower()
            if name not in dims or v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFF:
                return None
            dims[name] = v
        return TerminalSize(dims["width"], dims["height"])

    def _fail(self, why: str) -> None:
        log.warning("resize stream: undecodable terminal size (%s); ignoring further resizes", why)
        self.failed = True
        self._buf = ""
        self._raw = b""


async def _wait_stdin_room(io: SessionIO) -> None:
    # SessionIO's stdin queue is unbounded: pause reading the client while the runtime lags
    while io.stdin.qsize() >= _STDIN_QUEUE_LIMIT and not io.client_gone.is_set():
        await asyncio.sleep(0.005)


async def _discard(stream: Any) -> None:
    while await stream.read():
        pass


async def serve_remotecommand(
    request: StreamRequest,
    transport: SpdyTransport | WebSocketTransport,
    run: Callable[[SessionIO], Awaitable[ExecOutcome]],
    *,
    stream_creation_timeout: float = DEFAULT_STREAM_CREATION_TIMEOUT,
) -> ExecOutcome:
    """Serve one exec/attach session: decode the client's streams into a SessionIO, `run` it,
    write the outcome on the error stream in the negotiated protocol's form and close.

    If the client never opens its streams (SPDY, within `stream_creation_timeout`) or goes away
    first, `run` is not called and the outcome carries the error."""
    session: _RemoteCommand
    if hasattr(transport, "session"):
        session = _SpdyRemoteCommand(request, transport, stream_creation_timeout)
    else:
        session = _WebSocketRemoteCommand(request, transport)
    return await session.serve(run)


class _RemoteCommand:
    json_status = False

    def __init__(self, request: StreamRequest) -> None:
        self.request = request
        self.tty = bool(request.tty)
        # as k8s: with a tty there is no separate stderr
        self.want_stderr = bool(request.stderr) and not self.tty
        self.tasks: list[asyncio.Task[None]] = []

    async def serve(self, run: Callable[[SessionIO], Awaitable[ExecOutcome]]) -> ExecOutcome:
        io: SessionIO | None = None
        try:
            error = await self.open()
            if error:
                log.warning("%s session not started: %s", self.request.kind, error)
                return ExecOutcome(error=error)
            io = self.session_io()
            self.start(io)
            outcome = await self._run(run, io)
            if not io.client_gone.is_set():
                await self.write_status(outcome)
            return outcome
        finally:
            if io is not None and not io.client_gone.is_set():
                io.client_gone.set()  # the session is over either way: nobody reads or writes now
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.shutdown()

    async def _run(self, run: Callable[[SessionIO], Awaitable[ExecOutcome]], io: SessionIO) -> ExecOutcome:
        try:
            return await run(io)
        except ClientGone as exc:
            io.client_gone.set()
            return ExecOutcome(error=str(exc) or "the client closed the stream")
        except Exception as exc:  # a runtime failure is the client's error message, not ours to raise
            log.warning("%s session: the runtime failed: %s", self.request.kind, exc, exc_info=True)
            return ExecOutcome(error=str(exc) or type(exc).__name__)

    def spawn(self, coro: Awaitable[None]) -> None:
        self.tasks.append(asyncio.ensure_future(coro))

    def guarded(self, io: SessionIO, write: Callable[[bytes], Awaitable[None]]) -> Sink:
        async def sink(data: bytes) -> None:
            try:
                await write(data)
            except ClientGone:
                io.client_gone.set()
                raise
            except Exception as exc:  # the connection broke under the write
                io.client_gone.set()
                raise ClientGone(f"the client connection failed: {exc}") from exc
        return sink

    async def write_status(self, outcome: ExecOutcome) -> None:
        status = exec_status(self.request.kind, tuple(self.request.cmd), outcome)
        data = encode_status(status, self.json_status)
        try:
            await self.write_error(data)
        except Exception as exc:
            log.info("%s session: could not write the status: %s", self.request.kind, exc)

    # per transport
    async def open(self) -> str: ...
    def session_io(self) -> SessionIO: ...
    def start(self, io: SessionIO) -> None: ...
    async def write_error(self, data: bytes) -> None: ...
    async def shutdown(self) -> None: ...


class _SpdyRemoteCommand(_RemoteCommand):
    def __init__(self, request: StreamRequest, transport: SpdyTransport, timeout: float) -> None:
        super().__init__(request)
        self.session = transport.session
        self.version = _spdy_version(transport.protocol)
        self.json_status = self.version >= 4  # v5 over SPDY is v4 (SPDY has its own half-close)
        self.timeout = timeout
        self.streams: dict[str, Any] = {}
        self.accepting: asyncio.Future[Any] | None = None

    def _expected(self) -> tuple[set[str], set[str]]:
        """The stream types the request needs, and every type this version knows."""
        known = {STREAM_ERROR, STREAM_STDIN, STREAM_STDOUT, STREAM_STDERR}
        required = {STREAM_ERROR}
        if self.request.stdin:
            required.add(STREAM_STDIN)
        if self.request.stdout:
            required.add(STREAM_STDOUT)
        if self.want_stderr:
            required.add(STREAM_STDERR)
        if self.version >= 3:
            known.add(STREAM_RESIZE)
            if self.tty:
                required.add(STREAM_RESIZE)
        return required, known

    async def open(self) -> str:
        # k8s counts streams up to the number the request implies; waiting for the types instead
        # also serves a client that opens a stream the request did not ask for (stdin without -i)
        required, known = self._expected()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while not required <= self.streams.keys():
            if self.accepting is None:
                self.accepting = asyncio.ensure_future(self.session.accept())
            remaining = deadline - loop.time()
            done, _ = await asyncio.wait({self.accepting}, timeout=max(remaining, 0))
            if not done:
                return "timed out waiting for client to create streams"
            stream, self.accepting = self.accepting.result(), None
            if stream is None:
                return "the client closed the connection before creating its streams"
            self._take(stream, known)
        if self.version == 1 and STREAM_STDIN in self.streams:
            # as k8s v1: the server's half of stdin is closed at once (it only reads it)
            await self.streams[STREAM_STDIN].close()
        return ""

    def session_io(self) -> SessionIO:
        stdout, stderr = self.streams.get(STREAM_STDOUT), self.streams.get(STREAM_STDERR)
        io = SessionIO(
            tty=self.tty,
            stdin_enabled=bool(self.request.stdin) and STREAM_STDIN in self.streams,
            stdout_enabled=bool(self.request.stdout) and stdout is not None,
            stderr_enabled=self.want_stderr and stderr is not None,
        )
        if io.stdout_enabled:
            io.stdout_sink = self.guarded(io, stdout.write)
        if io.stderr_enabled:
            io.stderr_sink = self.guarded(io, stderr.write)
        return io

    def start(self, io: SessionIO) -> None:
        for kind, stream in self.streams.items():
            if kind == STREAM_STDIN and io.stdin_enabled:
                self.spawn(self._pump_stdin(io, stream))
            elif kind == STREAM_RESIZE:
                self.spawn(self._pump_resize(io, stream))
            else:
                # nothing is expected there, but unread data would hold the SPDY frame loop
                self.spawn(_discard(stream))
        self.spawn(self._watch(io))

    async def _pump_stdin(self, io: SessionIO, stream: Any) -> None:
        while True:
            data = await stream.read()
            io.feed_stdin(data)
            if not data:  # the client's FIN (or a reset, or the connection's end)
                return
            await _wait_stdin_room(io)

    async def _pump_resize(self, io: SessionIO, stream: Any) -> None:
        decoder = ResizeDecoder()
        while not decoder.failed:
            data = await stream.read()
            if not data:
                return
            for size in decoder.feed(data):
                io.resizes.put_nowait(size)
        await _discard(stream)

    def _take(self, stream: Any, known: set[str]) -> str:
        """Keeps a stream of a known type not seen yet (its type); refuses any other ("")."""
        kind = stream.headers.get(STREAM_TYPE_HEADER, "")
        if kind not in known or kind in self.streams:
            why = "a second" if kind in self.streams else "an unexpected"
            log.warning("%s session: %s stream of type %r refused", self.request.kind, why, kind)
            stream.reset(_REFUSED_STREAM)
            return ""
        self.streams[kind] = stream
        return kind

    async def _watch(self, io: SessionIO) -> None:
        """The client is gone once the SPDY connection ends. Streams it opens late are kept
        (and closed at the end, as the client reads them to EOF) if of a known type not seen yet."""
        closed = asyncio.ensure_future(self.session.closed.wait())
        try:
            while True:
                if self.accepting is None:
                    self.accepting = asyncio.ensure_future(self.session.accept())
                done, _ = await asyncio.wait({self.accepting, closed}, return_when=asyncio.FIRST_COMPLETED)
                if closed in done:
                    break
                stream, self.accepting = self.accepting.result(), None
                if stream is None:
                    break
                kind = self._take(stream, self._expected()[1])
                if kind == STREAM_RESIZE:
                    self.spawn(self._pump_resize(io, stream))
                elif kind:
                    self.spawn(_discard(stream))  # a stream the request did not ask for
        finally:
            closed.cancel()
        io.client_gone.set()

    async def write_error(self, data: bytes) -> None:
        stream = self.streams.get(STREAM_ERROR)
        if stream is not None and data:
            await stream.write(data)

    async def shutdown(self) -> None:
        if self.accepting is not None:
            self.accepting.cancel()
        # the client reads each to EOF. The error stream first: a v1 client stops at the outputs'
        # EOF and reports an error only if it has read the whole error stream by then
        order = [STREAM_ERROR, STREAM_STDOUT, STREAM_STDERR, STREAM_STDIN, STREAM_RESIZE]
        for kind in order:
            stream = self.streams.get(kind)
            if stream is None:
                continue
            try:
                await stream.close()
            except Exception as exc:
                log.debug("closing the %s stream: %s", kind, exc)
        try:
            await self.session.close()
        except Exception as exc:
            log.debug("closing the SPDY session: %s", exc)


class _WebSocketRemoteCommand(_RemoteCommand):
    def __init__(self, request: StreamRequest, transport: WebSocketTransport) -> None:
        super().__init__(request)
        self.conn = transport.conn
        protocol = transport.protocol or ""
        self.base64 = "base64" in protocol
        self.json_status = protocol.startswith(("v4.", "v5."))
        self.stream_close = protocol == "v5.channel.k8s.io"  # a malformed close ends the session
        self.send_lock = asyncio.Lock()
        self.stdin_open = bool(request.stdin)

    def frame(self, channel: int, data: bytes) -> bytes | str:
        if self.base64:
            return chr(ord("0") + channel) + base64.b64encode(data).decode()
        return bytes((channel,)) + data

    async def send(self, channel: int, data: bytes) -> None:
        async with self.send_lock:
            await self.conn.send(self.frame(channel, data))

    async def open(self) -> str:
        # as k8s: an empty message on the first channel the client reads, as the session opens
        if self.request.stdout:
            first = CHANNEL_STDOUT
        elif self.want_stderr:
            first = CHANNEL_STDERR
        else:
            first = CHANNEL_ERROR
        try:
            await self.send(first, b"")
        except Exception as exc:
            return f"the client connection failed: {exc}"
        return ""

    def session_io(self) -> SessionIO:
        io = SessionIO(tty=self.tty, stdin_enabled=bool(self.request.stdin),
                       stdout_enabled=bool(self.request.stdout), stderr_enabled=self.want_stderr)
        if io.stdout_enabled:
            io.stdout_sink = self.guarded(io, lambda data: self.send(CHANNEL_STDOUT, data))
        if io.stderr_enabled:
            io.stderr_sink = self.guarded(io, lambda data: self.send(CHANNEL_STDERR, data))
        return io

    def start(self, io: SessionIO) -> None:
        self.spawn(self._receive(io))

    async def _receive(self, io: SessionIO) -> None:
        """The one reader of the connection: stdin and resize messages, the v5 close signal."""
        resize = ResizeDecoder()
        try:
            while True:
                message = await self.conn.receive()
                if message is None:
                    break
                if isinstance(message, str):
                    message = message.encode()
                if not message:
                    continue
                if message[0] == CHANNEL_CLOSE and not self.base64:
                    if self.stream_close and (len(message) != 2 or message[1] > CHANNEL_RESIZE):
                        log.warning("%s session: bad close signal %r; closing", self.request.kind, message)
                        break
                    # client-go sends it whatever the version; before v5 k8s drops it (255 is no
                    # channel) and stdin never ends. Honoured here: no valid v4 message starts with 255
                    if message[1:] == bytes((CHANNEL_STDIN,)):
                        self._close_stdin(io)
                    continue
                channel = message[0] - ord("0") if self.base64 else message[0]
                data = message[1:]
                if self.base64:
                    try:
                        data = base64.b64decode(data, validate=True)
                    except (binascii.Error, ValueError):
                        log.warning("%s session: bad base64 on channel %d", self.request.kind, channel)
                        continue
                if channel == CHANNEL_STDIN:
                    if self.stdin_open and data:
                        io.feed_stdin(data)
                        await _wait_stdin_room(io)
                elif channel == CHANNEL_RESIZE:
                    for size in resize.feed(data):
                        io.resizes.put_nowait(size)
                # other channels are the server's to write: ignored, as k8s does
        finally:
            self._close_stdin(io)
            io.client_gone.set()

    def _close_stdin(self, io: SessionIO) -> None:
        if self.stdin_open:
            self.stdin_open = False
            io.feed_stdin(b"")

    async def write_error(self, data: bytes) -> None:
        if data:
            await self.send(CHANNEL_ERROR, data)

    async def shutdown(self) -> None:
        try:
            await self.conn.close(1000, "")
        except Exception as exc:
            log.debug("closing the WebSocket: %s", exc)

