"""WebSocket (RFC 6455) on the server side, over wsproto, once the HTTP request head is read.

`accept_websocket` answers the upgrade (101 with the chosen `Sec-WebSocket-Protocol`); a
`WebSocketConnection` then carries whole messages: a reader task feeds wsproto, answers pings,
completes the close handshake, and queues messages (bounded: a consumer that stops reading stops
the socket reads, TCP does the rest); `send` waits for the socket to drain. `tunnel_streams` turns
a connection into the reader/writer pair an SPDY session runs on (SPDY tunnelled in binary
messages, as client-go's TunnelingConnection does for `SPDY/3.1+portforward.k8s.io`).

The handshake checks and their statuses follow golang.org/x/net/websocket, which the Kubernetes
streaming server (k8s.io/streaming pkg/httpstream/wsstream) uses.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from pycrio.streaming.http import HTTPError, HTTPRequest

log = logging.getLogger("pycrio.streaming")

WEBSOCKET_VERSION = "13"
MAX_MESSAGE_SIZE = 32 << 20  # x/net/websocket's DefaultMaxPayloadBytes
RECEIVE_QUEUE = 16  # whole messages buffered ahead of the consumer
CLOSE_TIMEOUT = 5.0  # seconds to wait for the peer's close frame after ours
READ_CHUNK = 64 * 1024

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011


class WebSocketClosed(ConnectionError):
    """Sending on a WebSocket that is closing or closed."""


class StreamReaderLike(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class StreamWriterLike(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool: ...


# --- the handshake -------------------------------------------------------------------------------


def is_websocket_request(req: HTTPRequest) -> bool:
    """`Upgrade: websocket` and a Connection header naming upgrade (wsstream.IsWebSocketRequest)."""
    upgrade = (req.header("upgrade") or "").strip().lower()
    return upgrade == "websocket" and any("upgrade" in v.lower() for v in req.header_values("connection"))


def check_handshake(req: HTTPRequest) -> None:
    """Raise HTTPError unless `req` is a valid WebSocket opening handshake (x/net's checks, order
    and statuses: 405 for a method other than GET, 400 otherwise, a bad version with the
    `Sec-WebSocket-Version` we speak)."""
    if req.method != "GET":
        raise HTTPError(405, "bad method")
    if not is_websocket_request(req):
        raise HTTPError(400, "not websocket protocol")
    if not (req.header("sec-websocket-key") or "").strip():
        raise HTTPError(400, "mismatch challenge/response")
    if (req.header("sec-websocket-version") or "").strip() != WEBSOCKET_VERSION:
        raise HTTPError(
            400, "missing or bad WebSocket Version", [("Sec-WebSocket-Version", WEBSOCKET_VERSION)]
        )


def offered_subprotocols(req: HTTPRequest) -> list[str]:
    """The client's `Sec-WebSocket-Protocol` offers, in its order of preference."""
    return req.header_tokens("sec-websocket-protocol")


def negotiate_subprotocol(offered: list[str], supported: list[str]) -> str | None:
    """The first offer the server supports (the client's preference wins, as in x/net's handshake).

    A client that offers nothing gets "" when "" is supported (no Sec-WebSocket-Protocol in the
    answer); None means no common protocol (403)."""
    if not offered:
        return "" if "" in supported else None
    for protocol in offered:
        if protocol and protocol in supported:
            return protocol
    return None


async def accept_websocket(
    reader: StreamReaderLike,
    writer: StreamWriterLike,
    req: HTTPRequest,
    subprotocol: str,
    *,
    max_message_size: int = MAX_MESSAGE_SIZE,
) -> WebSocketConnection:
    """Answer a checked handshake with 101 (and `subprotocol` unless empty); the open connection."""
    ws = WSConnection(ConnectionType.SERVER)
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in req.headers]
    try:
        ws.initiate_upgrade_connection(headers, req.target)
        events = list(ws.events())
    except RemoteProtocolError as exc:
        raise HTTPError(400, f"bad websocket handshake: {exc}") from None
    if not any(isinstance(e, Request) for e in events):
        raise HTTPError(400, "bad websocket handshake")
    writer.write(ws.send(AcceptConnection(subprotocol=subprotocol or None)))
    await writer.drain()
    return WebSocketConnection(reader, writer, ws, subprotocol, max_message_size=max_message_size)


# --- the connection ------------------------------------------------------------------------------


class WebSocketConnection:
    """An open server-side WebSocket: whole messages in and out; must live on the running loop."""

    def __init__(
        self,
        reader: StreamReaderLike,
        writer: StreamWriterLike,
        ws: WSConnection,
        subprotocol: str = "",
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        queue_size: int = RECEIVE_QUEUE,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        self.subprotocol = subprotocol
        self.max_message_size = max_message_size
        self.close_timeout = close_timeout
        self.close_code: int | None = None  # the peer's close code, once it sent one
        self.closed = asyncio.Event()  # set once the socket is closed
        self._reader = reader
        self._writer = writer
        self._ws = ws
        self._queue: asyncio.Queue[bytes | str | None] = asyncio.Queue(queue_size)
        self._ended = False  # no message will be queued any more
        self._discard = False  # we are closing: incoming messages are dropped
        self._parts: list[Any] = []
        self._size = 0
        self._loop = asyncio.get_running_loop()
        self._abort_timer: asyncio.TimerHandle | None = None
        self._pump_task = self._loop.create_task(self._pump(), name="websocket-reader")

    # the consumer's side

    async def receive(self) -> bytes | str | None:
        """The next whole message (bytes for binary, str for text); None once the peer closed."""
        if self._ended and self._queue.empty():
            return None
        message = await self._queue.get()
        if message is None:
            self._queue.put_nowait(None)  # every later receive() sees the end too
        return message

    async def send(self, data: bytes | str) -> None:
        """Send one message (binary for bytes, text for str); returns once the socket drained."""
        self.send_nowait(data)
        await self.drain()

    def send_nowait(self, data: bytes | str) -> None:
        """Queue one message on the socket without waiting (the caller drains)."""
        if self._ws.state is not ConnectionState.OPEN or self._writer.is_closing():
            raise WebSocketClosed("the websocket is closed")
        event: Message[Any] = TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=bytes(data))
        self._writer.write(self._ws.send(event))

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise WebSocketClosed(f"the websocket connection broke: {exc}") from None

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Close handshake: our close frame, then the peer's (at most close_timeout), then the socket."""
        self.close_nowait(code, reason)
        try:
            await self._writer.drain()
        except ConnectionError:
            pass
        try:
            await asyncio.wait_for(asyncio.shield(self._pump_task), self.close_timeout)
        except Exception:  # TimeoutError: the peer never answered; or the reader failed
            pass
        finally:
            self._close_socket()
            if not self._pump_task.done():
                self._pump_task.cancel()
            try:
                await self._pump_task
            except (asyncio.CancelledError, Exception):
                pass

    def close_nowait(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send our close frame and stop taking messages; the socket closes when the peer answers
        (or after close_timeout)."""
        self._discard = True
        while not self._queue.empty():  # unblocks a reader task waiting on a full queue
            self._queue.get_nowait()
        if self._ended:
            self._queue.put_nowait(None)
        if self._ws.state is ConnectionState.OPEN and not self._writer.is_closing():
            try:
                self._writer.write(self._ws.send(CloseConnection(code=code, reason=reason or None)))
            except LocalProtocolError:
                pass
        if self._abort_timer is None and not self.closed.is_set():
            self._abort_timer = self._loop.call_later(self.close_timeout, self._close_socket)

    # the reader task

    async def _pump(self) -> None:
        try:
            while self._ws.state not in (ConnectionState.CLOSED,):
                try:
                    data = await self._reader.read(READ_CHUNK)
                except (ConnectionError, asyncio.IncompleteReadError):
                    data = b""
                self._ws.receive_data(data or None)
                for event in self._ws.events():
                    await self._on_event(event)
                if not data:
                    break
        except Exception:  # a protocol bug must not leave the socket open
            log.exception("websocket reader failed")
        finally:
            self._ended = True
            if not self._queue.full():
                self._queue.put_nowait(None)
            self._close_socket()

    async def _on_event(self, event: Any) -> None:
        if isinstance(event, Message):
            if self._discard:
                return
            self._size += len(event.data)
            if self._size > self.max_message_size:
                log.warning("websocket message over %d bytes: closing the connection", self.max_message_size)
                self._parts, self._size = [], 0
                self.close_nowait(CLOSE_TOO_BIG, "message too big")
                return
            self._parts.append(event.data)
            if event.message_finished:
                message: bytes | str = (
                    "".join(self._parts) if isinstance(event, TextMessage) else b"".join(self._parts)
                )
                self._parts, self._size = [], 0
                await self._queue.put(message)
        elif isinstance(event, Ping):
            if self._ws.state is ConnectionState.OPEN and not self._writer.is_closing():
                self._writer.write(self._ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            if self.close_code is None:
                self.close_code = event.code
            if self._ws.state is ConnectionState.REMOTE_CLOSING and not self._writer.is_closing():
                self._writer.write(self._ws.send(event.response()))
            elif self._ws.state is ConnectionState.OPEN:  # a frame that did not parse
                self._writer.write(self._ws.send(CloseConnection(code=event.code, reason=event.reason)))

    def _close_socket(self) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        if not self._writer.is_closing():
            self._writer.close()
        self.closed.set()


# --- SPDY tunnelled in binary messages -----------------------------------------------------------


class TunnelReader:
    """`readexactly` over the byte stream the peer's binary messages carry (message boundaries
    mean nothing, as in client-go's TunnelingConnection)."""

    def __init__(self, conn: WebSocketConnection) -> None:
        self._conn = conn
        self._buffer = bytearray()
        self._eof = False

    async def _fill(self) -> bool:
        if self._eof:
            return False
        message = await self._conn.receive()
        if message is None:
            self._eof = True
            return False
        if isinstance(message, str):
            raise ConnectionError("invalid message type received: text in a binary tunnel")
        self._buffer += message
        return True

    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if not await self._fill():
                partial = bytes(self._buffer)
                self._buffer.clear()
                raise asyncio.IncompleteReadError(partial, n)
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def read(self, n: int = -1) -> bytes:
        if not self._buffer:
            await self._fill()
        if n < 0 or n >= len(self._buffer):
            data = bytes(self._buffer)
            self._buffer.clear()
            return data
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def at_eof(self) -> bool:
        return self._eof and not self._buffer


class TunnelWriter:
    """Each `write` goes out as one binary message; `close` is a normal WebSocket close."""

    def __init__(self, conn: WebSocketConnection) -> None:
        self._conn = conn

    def write(self, data: bytes) -> None:
        if data and not self.is_closing():
            self._conn.send_nowait(bytes(data))

    async def drain(self) -> None:
        if self.is_closing():
            raise ConnectionResetError("the websocket tunnel is closed")
        await self._conn.drain()

    def close(self) -> None:
        self._conn.close_nowait(CLOSE_NORMAL)

    def is_closing(self) -> bool:
        return self._conn.closed.is_set() or self._conn._ws.state is not ConnectionState.OPEN

    async def wait_closed(self) -> None:
        await self._conn.closed.wait()


def tunnel_streams(conn: WebSocketConnection) -> tuple[TunnelReader, TunnelWriter]:
    """The reader/writer pair an SpdySession runs on inside `conn`."""
    return TunnelReader(conn), TunnelWriter(conn)
