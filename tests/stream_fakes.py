"""In-memory stand-ins for the streaming transports (the SPDY session, the WebSocket connection)
and the request, shaped as docs STREAMING_API.md describes them, so the k8s protocol layer
(remotecommand, portforward) can be tested on its own. Each fake has a server side (what the code
under test calls) and `client_*` methods the test drives, with optional flow control (`window`:
unread bytes a writer may leave before its write waits)."""

from __future__ import annotations

import asyncio
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator


@dataclass(frozen=True)
class Request:
    """Mirrors server.StreamRequest."""

    kind: str = "exec"
    container_id: str = "ctr1"
    pod_id: str = "pod1"
    cmd: tuple[str, ...] = ("sh", "-c", "exit 3")
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True
    ports: tuple[int, ...] = ()
    links: tuple = ()
    trace_carrier: dict = field(default_factory=dict)


@dataclass
class SpdyTransport:
    session: Any
    protocol: str
    tunnelled: bool = False


@dataclass
class WebSocketTransport:
    conn: Any
    protocol: str
    query: dict[str, list[str]] = field(default_factory=dict)


class _Pipe:
    """One direction of bytes with EOF and an optional window (back-pressure on the writer)."""

    def __init__(self, window: int | None = None) -> None:
        self.chunks: list[bytes] = []
        self.eof = False
        self.window = window
        self.cond = asyncio.Condition()

    def pending(self) -> int:
        return sum(len(c) for c in self.chunks)

    async def put(self, data: bytes) -> None:
        async with self.cond:
            if self.window is not None:
                await self.cond.wait_for(lambda: self.eof or self.pending() < self.window)
            if self.eof:
                raise ConnectionResetError("pipe closed")
            self.chunks.append(bytes(data))
            self.cond.notify_all()

    async def finish(self) -> None:
        async with self.cond:
            self.eof = True
            self.cond.notify_all()

    async def get(self) -> bytes:
        """The next chunk; b"" at EOF."""
        async with self.cond:
            await self.cond.wait_for(lambda: self.chunks or self.eof)
            if self.chunks:
                data = self.chunks.pop(0)
                self.cond.notify_all()
                return data
            return b""


class FakeSpdyStream:
    def __init__(self, session: FakeSpdySession, stream_id: int, headers: dict[str, str],
                 window: int | None) -> None:
        self.session = session
        self.stream_id = stream_id
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.to_server = _Pipe()
        self.to_client = _Pipe(window)
        self.remote_closed = False  # the client sent FIN or RST
        self.local_closed = False  # we sent FIN
        self.reset_status: int | None = None  # we sent RST
        self.client_reset_sent = False  # the client sent RST (reset_status is then CANCEL too)
        self.writes: list[bytes] = []  # everything the server wrote, in order

    # server side (the contract)
    async def read(self) -> bytes:
        return await self.to_server.get()

    async def write(self, data: bytes) -> None:
        if self.reset_status is not None or self.client_reset_sent or self.session.ended:
            raise ConnectionResetError(f"stream {self.stream_id} is reset")
        if self.local_closed:
            raise RuntimeError(f"write on half-closed stream {self.stream_id}")
        self.writes.append(bytes(data))
        await self.to_client.put(data)

    async def close(self) -> None:
        if self.reset_status is None and not self.local_closed:
            self.local_closed = True
            self.session.close_order.append(self.headers.get("streamtype", ""))
            await self.to_client.finish()

    def reset(self, status: int = 5) -> None:
        if self.reset_status is None:
            self.reset_status = status
            asyncio.ensure_future(self.to_client.finish())
            asyncio.ensure_future(self.to_server.finish())

    # client side
    async def client_send(self, data: bytes) -> None:
        await self.to_server.put(data)

    async def client_fin(self) -> None:
        self.remote_closed = True
        await self.to_server.finish()

    async def client_reset(self) -> None:
        self.remote_closed = True
        self.client_reset_sent = True
        if self.reset_status is None:
            self.reset_status = 5  # as spdy.SpdyStream: set once reset either way
        await self.to_server.finish()
        await self.to_client.finish()

    async def client_read(self) -> bytes:
        """The next chunk the server wrote; b"" once it closed or reset the stream."""
        return await self.to_client.get()

    async def client_read_all(self, timeout: float = 5.0) -> bytes:
        out = b""
        async with asyncio.timeout(timeout):
            while chunk := await self.to_client.get():
                out += chunk
        return out

    def all_written(self) -> bytes:
        return b"".join(self.writes)


class FakeSpdySession:
    """The server's SpdySession as the protocol layer sees it; the test opens the streams."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[FakeSpdyStream] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.ended = False
        self.close_calls = 0
        self.streams: list[FakeSpdyStream] = []
        self.close_order: list[str] = []  # stream types, in the order the server half-closed them
        self._next_id = 1

    async def accept(self) -> FakeSpdyStream | None:
        if not self.incoming.empty():
            return self.incoming.get_nowait()
        if self.ended:
            return None
        getter = asyncio.ensure_future(self.incoming.get())
        ended = asyncio.ensure_future(self.closed.wait())
        try:
            done, _ = await asyncio.wait({getter, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if getter in done:
            return getter.result()
        getter.cancel()
        return None

    async def close(self) -> None:
        self.close_calls += 1
        await self._end()

    async def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.closed.set()
        for s in self.streams:
            await s.to_server.finish()
            await s.to_client.finish()

    # client side
    def client_open(self, headers: dict[str, str], window: int | None = None) -> FakeSpdyStream:
        stream = FakeSpdyStream(self, self._next_id, headers, window)
        self._next_id += 2
        self.streams.append(stream)
        self.incoming.put_nowait(stream)
        return stream

    async def client_disconnect(self) -> None:
        await self._end()


class FakeWebSocket:
    """The server's WebSocketConnection; messages are bytes (binary) or str (text)."""

    def __init__(self, window: int | None = None) -> None:
        self.inbox: asyncio.Queue[bytes | str | None] = asyncio.Queue()
        self.outbox: list[bytes | str] = []
        self.cond = asyncio.Condition()
        self.window = window  # unread messages a sender may leave before send waits
        self.closed = False
        self.close_code: int | None = None
        self.sent: list[bytes | str] = []  # every message the server sent, in order

    async def receive(self) -> bytes | str | None:
        if self.closed and self.inbox.empty():
            return None
        message = await self.inbox.get()
        if message is None:
            self.inbox.put_nowait(None)  # stays ended for the next caller
        return message

    async def send(self, data: bytes | str) -> None:
        async with self.cond:
            if self.window is not None:
                await self.cond.wait_for(lambda: self.closed or len(self.outbox) < self.window)
            if self.closed:
                raise ConnectionResetError("websocket closed")
            self.outbox.append(data)
            self.sent.append(data)
            self.cond.notify_all()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        async with self.cond:
            if not self.closed:
                self.closed = True
                self.close_code = code
                self.inbox.put_nowait(None)
            self.cond.notify_all()

    # client side
    def client_send(self, message: bytes | str) -> None:
        self.inbox.put_nowait(message)

    async def client_close(self) -> None:
        await self.close(1000)

    async def client_recv(self, timeout: float = 5.0) -> bytes | str | None:
        """The next message the server sent; None once it closed the connection."""
        async with asyncio.timeout(timeout):
            async with self.cond:
                await self.cond.wait_for(lambda: self.outbox or self.closed)
                if self.outbox:
                    message = self.outbox.pop(0)
                    self.cond.notify_all()
                    return message
                return None

    async def client_recv_all(self, timeout: float = 5.0) -> list[bytes | str]:
        messages = []
        while (m := await self.client_recv(timeout)) is not None:
            messages.append(m)
        return messages


@asynccontextmanager
async def spdy_pair() -> AsyncIterator[tuple[Any, Any]]:
    """A real spdy.SpdySession pair (server, client) over a socketpair, both frame loops running."""
    from pycrio.streaming.spdy import SpdySession

    a, b = socket.socketpair()
    server_reader, server_writer = await asyncio.open_connection(sock=a)
    client_reader, client_writer = await asyncio.open_connection(sock=b)
    server = SpdySession(server_reader, server_writer, server=True)
    client = SpdySession(client_reader, client_writer, server=False)
    loops = [asyncio.ensure_future(server.run()), asyncio.ensure_future(client.run())]
    try:
        yield server, client
    finally:
        await client.close()
        await server.close()
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)


async def read_all(stream: Any, timeout: float = 5.0) -> bytes:
    """Everything a real SpdyStream delivers until the peer's FIN (or reset)."""
    out = b""
    async with asyncio.timeout(timeout):
        while chunk := await stream.read():
            out += chunk
    return out
