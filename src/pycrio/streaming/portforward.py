"""The Kubernetes port-forward protocol over SPDY streams (also tunnelled in a WebSocket) or
WebSocket channels.

Facts from k8s.io/cri-streaming@v0.37.2 pkg/streaming/portforward and k8s.io/client-go@v0.37.2
tools/portforward:

- SPDY ("portforward.k8s.io"): each forwarded connection is a pair of streams with the same
  `requestID` header (without one: the error stream's id, or the data stream's id - 2), a `port`
  header and `streamType` "error" or "data". A pair not complete within the stream creation
  timeout is dropped. The client half-closes its error stream at once and reads it to EOF;
  a message there is the connection's failure ("error forwarding port 80 to pod <id>, uid : ...").
  The client FINs the data stream at its local EOF and resets it once it read ours.
- WebSocket ("v4.channel.k8s.io", "v4.base64.channel.k8s.io" or none): one connection per port
  (from `?port=`, else the request's ports), channel 2i data and 2i+1 error for the i-th port;
  the server's first message on each is the port, 2 bytes little-endian. The connection is closed
  once every port's forwarding ended.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from pycrio.streaming.remotecommand import DEFAULT_STREAM_CREATION_TIMEOUT
from pycrio.streaming.session import SessionCounters

if TYPE_CHECKING:
    from pycrio.streaming.server import SpdyTransport, StreamRequest, WebSocketTransport

log = logging.getLogger("pycrio.streaming")

Dial = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

PORT_HEADER = "port"
REQUEST_ID_HEADER = "requestid"  # SPDY header names arrive lower-cased
STREAM_TYPE_HEADER = "streamtype"
STREAM_DATA, STREAM_ERROR = "data", "error"

_REFUSED_STREAM = 3
_CHUNK = 64 * 1024
_WS_QUEUE = 16  # messages buffered per WebSocket port before the reader waits for the pod


class PortRefused(Exception):
    """The port is not one the PortForward request named."""


async def serve_portforward(
    request: StreamRequest,
    transport: SpdyTransport | WebSocketTransport,
    dial: Dial,
    counters: SessionCounters,
    *,
    stream_creation_timeout: float = DEFAULT_STREAM_CREATION_TIMEOUT,
) -> None:
    """Forward every connection the client opens to `dial(port)` until the client goes away.

    With request.ports empty any port may be forwarded (kubelet's SPDY path sends none);
    otherwise a port not among them is refused on that connection's error stream."""
    if hasattr(transport, "session"):
        await _SpdyPortForward(request, transport, dial, counters, stream_creation_timeout).serve()
    else:
        await _WebSocketPortForward(request, transport, dial, counters).serve()


def _forward_error(request: StreamRequest, port: int, err: BaseException | str) -> str:
    # cri-streaming's wording; the CRI server passes no pod uid
    return f"error forwarding port {port} to pod {request.pod_id}, uid : {err}"


async def _connect(request: StreamRequest, dial: Dial, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if request.ports and port not in request.ports:
        allowed = ", ".join(str(p) for p in request.ports)
        raise PortRefused(f"port {port} is not among the ports of the PortForward request ({allowed})")
    return await dial(port)


async def _upload(read: Callable[[], Awaitable[bytes]], writer: asyncio.StreamWriter,
                  counters: SessionCounters) -> None:
    """Client -> pod until the client's EOF, which half-closes the pod connection."""
    try:
        while data := await read():
            counters.bytes_in += len(data)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
    except (ConnectionError, OSError) as exc:
        log.debug("port-forward upload ended: %s", exc)


async def _discard(stream: Any) -> None:
    while await stream.read():
        pass


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass


class _Pair:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.data: Any = None
        self.error: Any = None
        self.timer: asyncio.TimerHandle | None = None

    @property
    def complete(self) -> bool:
        return self.data is not None and self.error is not None


class _SpdyPortForward:
    def __init__(self, request: StreamRequest, transport: SpdyTransport, dial: Dial,
                 counters: SessionCounters, timeout: float) -> None:
        self.request = request
        self.session = transport.session
        self.dial = dial
        self.counters = counters
        self.timeout = timeout
        self.pairs: dict[str, _Pair] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self) -> None:
        try:
            while (stream := await self.session.accept()) is not None:
                self._take(stream)
        finally:
            # the connection is gone: every forwarded connection with it
            for pair in self.pairs.values():
                if pair.timer is not None:
                    pair.timer.cancel()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            try:
                await self.session.close()
            except Exception as exc:
                log.debug("closing the SPDY session: %s", exc)

    def _take(self, stream: Any) -> None:
        headers = stream.headers
        problem = ""
        port_text = headers.get(PORT_HEADER, "")
        kind = headers.get(STREAM_TYPE_HEADER, "")
        if not port_text:
            problem = f"{PORT_HEADER!r} header is required"
        elif not port_text.isdigit() or not 0 < int(port_text) < 65536:
            problem = f"unable to parse {port_text!r} as a port"
        elif kind not in (STREAM_DATA, STREAM_ERROR):
            problem = f"invalid stream type {kind!r}" if kind else f"{STREAM_TYPE_HEADER!r} header is required"
        if problem:
            log.warning("port-forward: stream %s refused: %s", stream.stream_id, problem)
            stream.reset(_REFUSED_STREAM)
            return
        request_id = headers.get(REQUEST_ID_HEADER, "")
        if not request_id:
            request_id = str(stream.stream_id if kind == STREAM_ERROR else stream.stream_id - 2)
        pair = self.pairs.get(request_id)
        if pair is None:
            pair = self.pairs[request_id] = _Pair(request_id)
            pair.timer = asyncio.get_running_loop().call_later(self.timeout, self._expire, pair)
        if getattr(pair, kind) is not None:
            msg = f"error processing stream for request {request_id}: {kind} stream already assigned"
            log.warning("port-forward: %s", msg)
            stream.reset(_REFUSED_STREAM)
            if pair.error is not None:
                self._spawn(self._write_error(pair.error, msg, close=False))
            return
        setattr(pair, kind, stream)
        if pair.complete:
            del self.pairs[request_id]
            if pair.timer is not None:
                pair.timer.cancel()
            self._spawn(self._forward(pair))

    def _expire(self, pair: _Pair) -> None:
        if self.pairs.get(pair.request_id) is not pair:
            return
        del self.pairs[pair.request_id]
        msg = f"(request={pair.request_id}) timed out waiting for streams"
        log.warning("port-forward: %s", msg)
        if pair.data is not None:
            pair.data.reset()
        if pair.error is not None:
            self._spawn(self._write_error(pair.error, msg, close=True))

    async def _write_error(self, stream: Any, msg: str, *, close: bool) -> None:
        try:
            await stream.write(msg.encode())
            if close:
                await stream.close()
        except Exception as exc:
            log.debug("port-forward: writing the error stream: %s", exc)

    async def _forward(self, pair: _Pair) -> None:
        port = int(pair.data.headers[PORT_HEADER])
        # the client sends nothing on the error stream, but unread data would hold the frame loop
        discard = asyncio.ensure_future(_discard(pair.error))
        try:
            await self._forward_pair(pair, port)
        finally:
            discard.cancel()

    async def _forward_pair(self, pair: _Pair, port: int) -> None:
        try:
            try:
                reader, writer = await _connect(self.request, self.dial, port)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                msg = _forward_error(self.request, port, exc)
                log.warning("port-forward: %s", msg)
                await self._write_error(pair.error, msg, close=True)
                await pair.data.close()
                return
            up = asyncio.ensure_future(_upload(pair.data.read, writer, self.counters))
            down = asyncio.ensure_future(self._download(reader, pair.data))
            try:
                done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
                if up in done and getattr(pair.data, "reset_status", None) is not None:
                    # a reset, not a FIN: the client dropped the connection, the pod's reply too
                    down.cancel()
                results = await asyncio.gather(up, down, return_exceptions=True)
            finally:
                up.cancel()
                down.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
                await _close_writer(writer)
            for result in results:
                if isinstance(result, Exception):
                    raise result
            await pair.error.close()
        except asyncio.CancelledError:
            pair.data.reset()
            pair.error.reset()
            raise
        except Exception as exc:  # one connection's failure is not the session's
            log.warning("port-forward: connection %s to port %d failed: %s", pair.request_id, port, exc)
            pair.data.reset()
            pair.error.reset()

    async def _download(self, reader: asyncio.StreamReader, stream: Any) -> None:
        """Pod -> client until the pod's EOF, which half-closes the data stream."""
        try:
            while data := await reader.read(_CHUNK):
                self.counters.bytes_out += len(data)
                await stream.write(data)
        except (ConnectionError, OSError) as exc:
            log.debug("port-forward download ended: %s", exc)
        await stream.close()


class _WebSocketPortForward:
    def __init__(self, request: StreamRequest, transport: WebSocketTransport, dial: Dial,
                 counters: SessionCounters) -> None:
        self.request = request
        self.conn = transport.conn
        self.query = transport.query or {}
        self.base64 = "base64" in (transport.protocol or "")
        self.dial = dial
        self.counters = counters
        self.send_lock = asyncio.Lock()
        self.uploads: list[asyncio.Queue[bytes]] = []
        self.ended = asyncio.Event()  # the client closed the connection: every upload's EOF

    def _ports(self) -> list[int]:
        values = self.query.get(PORT_HEADER)
        if not values:
            return list(self.request.ports)
        ports = []
        for value in values:
            for text in value.split(","):
                if not text.isdigit() or not 0 < int(text) < 65536:
                    raise ValueError(f"unable to parse {text!r} as a port")
                ports.append(int(text))
        return ports

    async def send(self, channel: int, data: bytes) -> None:
        if self.base64:
            message: bytes | str = chr(ord("0") + channel) + base64.b64encode(data).decode()
        else:
            message = bytes((channel,)) + data
        async with self.send_lock:
            await self.conn.send(message)

    async def serve(self) -> None:
        reading: asyncio.Task[None] | None = None
        forwards: list[asyncio.Task[None]] = []
        try:
            try:
                ports = self._ports()
            except ValueError as exc:
                log.warning("port-forward: %s", exc)
                return
            if not ports:
                log.warning("port-forward: no port to forward")
                return
            for i, port in enumerate(ports):
                head = port.to_bytes(2, "little")
                await self.send(2 * i, head)
                await self.send(2 * i + 1, head)
                self.uploads.append(asyncio.Queue(_WS_QUEUE))
            reading = asyncio.ensure_future(self._receive())
            forwards = [asyncio.ensure_future(self._forward(i, p)) for i, p in enumerate(ports)]
            await asyncio.gather(*forwards)
        except (ConnectionError, OSError) as exc:
            log.debug("port-forward: the WebSocket failed: %s", exc)
        finally:
            for task in [*forwards, *([reading] if reading else [])]:
                task.cancel()
            await asyncio.gather(*forwards, *([reading] if reading else []), return_exceptions=True)
            try:
                await self.conn.close(1000, "")
            except Exception as exc:
                log.debug("closing the WebSocket: %s", exc)

    async def _receive(self) -> None:
        try:
            while (message := await self.conn.receive()) is not None:
                if isinstance(message, str):
                    message = message.encode()
                if not message:
                    continue
                channel = message[0] - ord("0") if self.base64 else message[0]
                data = message[1:]
                if self.base64:
                    try:
                        data = base64.b64decode(data, validate=True)
                    except (binascii.Error, ValueError):
                        log.warning("port-forward: bad base64 on channel %d", channel)
                        continue
                index, odd = divmod(channel, 2)
                if odd or index >= len(self.uploads) or not data:
                    continue  # error channels are ours to write
                await self.uploads[index].put(data)
        finally:
            self.ended.set()

    async def _read_upload(self, index: int) -> bytes:
        """The next chunk the client sent for this port; b"" once the connection ended."""
        queue = self.uploads[index]
        if not queue.empty() or not self.ended.is_set():
            getter = asyncio.ensure_future(queue.get())
            ended = asyncio.ensure_future(self.ended.wait())
            try:
                done, _ = await asyncio.wait({getter, ended}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
            if getter in done:
                return getter.result()
            getter.cancel()
        return queue.get_nowait() if not queue.empty() else b""

    async def _forward(self, index: int, port: int) -> None:
        try:
            reader, writer = await _connect(self.request, self.dial, port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            msg = _forward_error(self.request, port, exc)
            log.warning("port-forward: %s", msg)
            try:
                await self.send(2 * index + 1, msg.encode())
            except Exception as send_exc:
                log.debug("port-forward: writing the error channel: %s", send_exc)
            return
        upload = asyncio.ensure_future(_upload(lambda: self._read_upload(index), writer, self.counters))
        try:
            # WebSocket channels have no half-close: the pod's EOF ends this port's forwarding
            while data := await reader.read(_CHUNK):
                self.counters.bytes_out += len(data)
                await self.send(2 * index, data)
        except Exception as exc:  # the pod connection or the WebSocket broke
            log.debug("port-forward download ended: %s", exc)
        finally:
            upload.cancel()
            await asyncio.gather(upload, return_exceptions=True)
            await _close_writer(writer)
