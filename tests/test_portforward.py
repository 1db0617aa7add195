"""portforward: the k8s port-forward protocol (SPDY stream pairs, WebSocket channel pairs) over
in-memory transports (tests/stream_fakes.py), forwarding to real asyncio servers on loopback."""

from __future__ import annotations

import asyncio
import base64
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from pycrio.streaming.portforward import serve_portforward
from pycrio.streaming.session import SessionCounters
from tests.stream_fakes import (FakeSpdySession, FakeWebSocket, Request, SpdyTransport, WebSocketTransport,
                                read_all, spdy_pair)


def arun(coro: Awaitable[Any], timeout: float = 20.0) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(main())


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echoes until the peer's EOF, then closes."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def count_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Replies only after the peer half-closed: proves the client's EOF reached the pod as EOF."""
    total = 0
    while data := await reader.read(65536):
        total += len(data)
    writer.write(f"got {total} bytes".encode())
    await writer.drain()
    writer.close()


class Pod:
    """Servers on loopback standing in for the pod's ports; dial() maps a pod port to them."""

    def __init__(self) -> None:
        self.ports: dict[int, int] = {}
        self.dialed: list[int] = []
        self.writers: list[asyncio.StreamWriter] = []  # our ends of the pod connections
        self.servers: list[asyncio.AbstractServer] = []

    async def serve(self, pod_port: int, handler: Handler) -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        self.servers.append(server)
        self.ports[pod_port] = server.sockets[0].getsockname()[1]

    async def dial(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.dialed.append(port)
        if port not in self.ports:
            # nothing listens there: a real refused connection on loopback
            probe = await asyncio.start_server(echo, "127.0.0.1", 0)
            free = probe.sockets[0].getsockname()[1]
            probe.close()
            await probe.wait_closed()
            return await asyncio.open_connection("127.0.0.1", free)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.ports[port])
        self.writers.append(writer)
        return reader, writer

    def close(self) -> None:
        for s in self.servers:
            s.close()


@asynccontextmanager
async def spdy_forward(request: Request, pod: Pod, **kw: Any) -> AsyncIterator[tuple[FakeSpdySession, asyncio.Future[None], SessionCounters]]:
    session = FakeSpdySession()
    counters = SessionCounters()
    served = asyncio.ensure_future(serve_portforward(request, SpdyTransport(session, "portforward.k8s.io"),
                                                     pod.dial, counters, **kw))
    try:
        yield session, served, counters
    finally:
        await session.client_disconnect()
        await served
        pod.close()


def client_connection(session: FakeSpdySession, port: int, request_id: int | None,
                      window: int | None = None) -> tuple[Any, Any]:
    """What client-go's handleConnection opens: the error stream (half-closed at once), then data."""
    headers = {"streamType": "error", "port": str(port)}
    if request_id is not None:
        headers["requestID"] = str(request_id)
    error = session.client_open(headers)
    data = session.client_open({**headers, "streamType": "data"}, window=window)
    return error, data


def test_spdy_pair_echo_and_half_close() -> None:
    async def main() -> None:
        pod = Pod()
        await pod.serve(80, echo)
        async with spdy_forward(Request(kind="portforward", ports=(80,)), pod) as (session, served, counters):
            error, data = client_connection(session, 80, 0)
            await error.client_fin()
            await data.client_send(b"hello")
            assert await data.client_read() == b"hello"
            await data.client_fin()  # the local EOF -> the pod's EOF -> echo closes -> our FIN
            assert await data.client_read_all() == b""
            assert data.local_closed
            assert await error.client_read_all() == b"", "a clean connection leaves the error stream empty"
            assert error.local_closed
            assert (counters.bytes_in, counters.bytes_out) == (5, 5)
            assert not served.done()
    arun(main())


def test_spdy_client_eof_reaches_pod_as_half_close() -> None:
    async def main() -> None:
        pod = Pod()
        await pod.serve(8080, count_then_reply)
        async with spdy_forward(Request(kind="portforward"), pod) as (session, _, _c):
            error, data = client_connection(session, 8080, 7)
            await data.client_send(b"x" * 1000)
            await data.client_send(b"y" * 24)
            await data.client_fin()
            assert await data.client_read_all() == b"got 1024 bytes"
            assert await error.client_read_all() == b""
    arun(main())


def test_spdy_pair_without_request_id() -> None:
    """No requestID header: the pair is error stream id N and data stream id N + 2."""
    async def main() -> None:
        pod = Pod()
        await pod.serve(80, echo)
        async with spdy_forward(Request(kind="portforward"), pod) as (session, _, _c):
            error, data = client_connection(session, 80, None)
            assert data.stream_id == error.stream_id + 2
            await data.client_send(b"ping")
            assert await data.client_read() == b"ping"
    arun(main())


def test_spdy_data_before_error_stream() -> None:
    async def main() -> None:
        pod = Pod()
        await pod.serve(80, echo)
        async with spdy_forward(Request(kind="portforward"), pod) as (session, _, _c):
            data = session.client_open({"streamType": "data", "port": "80", "requestID": "5"})
            await asyncio.sleep(0.05)
            assert pod.dialed == [], "nothing is dialled before the pair is complete"
            session.client_open({"streamType": "error", "port": "80", "requestID": "5"})
            await data.client_send(b"late")
            assert await data.client_read() == b"late"
    arun(main())


def test_spdy_unknown_port_refused_on_error_stream() -> None:
    async def main() -> None:
        pod = Pod()
        await pod.serve(80, echo)
        async with spdy_forward(Request(kind="portforward", pod_id="podA", ports=(80, 8080)), pod) as (session, _, _c):
            error, data = client_connection(session, 81, 0)
            message = await error.client_read_all()
            assert message == (b"error forwarding port 81 to pod podA, uid : port 81 is not among "
                               b"the ports of the PortForward request (80, 8080)")
            assert await data.client_read_all() == b""
            assert pod.dialed == []
    arun(main())


def test_spdy_dial_failure_does_not_close_others() -> None:
    async def main() -> None:
        pod = Pod()
        await pod.serve(80, echo)
        async with spdy_forward(Request(kind="portforward", pod_id="podA"), pod) as (session, served, _c):
            good_error, good = client_connection(session, 80, 0)
            await good.client_send(b"one")
            assert await good.client_read() == b"one"
            bad_error, bad = client_connection(session, 9999, 1)  # nothing listens on 9999
            message = (await bad_error.client_read_all()).decode()
            assert message.startswith("error forwarding port 9999 to pod podA, uid : ")
            assert "refused" in message.lower() or "connect" in message.lower()
            assert bad_error.local_closed and await bad.client_read_all() == b""
            # the other connection and the session live on
            await good.client_send(b"two")
            assert await good.client_read() == b"two"
            assert not good.local_closed and not served.done()
            third_error, third = client_connection(session, 80, 2)
            await third.client_send(b"three")
            assert await third.client_read() == b"three"
    arun(main())


def test_spdy_ten_concurrent_connections() -> None:
    async def main() -> None:
        pod = Pod()
        await pod.serve(80, echo)
        await pod.serve(8080, echo)
        async with spdy_forward(Request(kind="portforward", ports=(80, 8080)), pod) as (session, _, counters):
            async def one(i: int) -> bytes:
                error, data = client_connection(session, 80 if i % 2 else 8080, i, window=32 * 1024)
                await error.client_fin()
                payload = os.urandom(200_000 + i)

                async def send() -> None:
                    for off in range(0, len(payload), 16 * 1024):
                        await data.client_send(payload[off:off + 16 * 1024])
                    await data.client_fin()
                sender = asyncio.ensure_future(send())
                got = await data.client_read_all(timeout=15)
                await sender
                assert await error.client_read_all() == b""
                assert got == payload, f"connection {i}: {len(got)} of {len(payload)} bytes"
                return got
            results = await asyncio.gather(*(one(i) for i in range(10)))
            total = sum(len(r) for r in results)
            assert counters.bytes_in == counters.bytes_out == total
            assert sorted(pod.dialed) == [80] * 5 + [8080] * 5
    arun(main())


def test_spdy_backpressure_from_client_window() -> None:
    """A client that does not read holds the pod back: we do not buffer the pod's output."""
    async def main() -> None:
        async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                for _ in range(256):
                    writer.write(b"z" * 16384)
                    await writer.drain()
            except ConnectionError:
                pass
            writer.close()
        pod = Pod()
        await pod.serve(80, flood)
        async with spdy_forward(Request(kind="portforward"), pod) as (session, _, counters):
            error, data = client_connection(session, 80, 0, window=64 * 1024)
            await asyncio.sleep(0.3)
            # window + one read chunk at most, not the 4 MiB the pod wants to send
            assert counters.bytes_out <= 64 * 1024 + 64 * 1024
            assert len(await data.client_read_all()) == 256 * 16384
    arun(main())


def test_spdy_pair_timeout() -> None:
    async def main() -> None:
        pod = Pod()
        async with spdy_forward(Request(kind="portforward"), pod, stream_creation_timeout=0.2) as (session, _, _c):
            lone_error = session.client_open({"streamType": "error", "port": "80", "requestID": "1"})
            lone_data = session.client_open({"streamType": "data", "port": "80", "requestID": "2"})
            assert await lone_error.client_read_all() == b"(request=1) timed out waiting for streams"
            await asyncio.sleep(0.1)
            assert lone_data.reset_status is not None
            # a pair completed after the timeout is a new, incomplete pair: nothing is dialled
            session.client_open({"streamType": "data", "port": "80", "requestID": "1"})
            await asyncio.sleep(0.05)
            assert pod.dialed == []
    arun(main())


def test_spdy_bad_headers_refused() -> None:
    async def main() -> None:
        pod = Pod()
        await pod.serve(80, echo)
        async with spdy_forward(Request(kind="portforward"), pod) as (session, _, _c):
            no_port = session.client_open({"streamType": "data", "requestID": "1"})
            bad_port = session.client_open({"streamType": "data", "port": "70000", "requestID": "2"})
            bad_type = session.client_open({"streamType": "stdout", "port": "80", "requestID": "3"})
            # a second data stream for an incomplete pair is refused (k8s: "already assigned")
            data = session.client_open({"streamType": "data", "port": "80", "requestID": "4"})
            dup = session.client_open({"streamType": "data", "port": "80", "requestID": "4"})
            session.client_open({"streamType": "error", "port": "80", "requestID": "4"})
            await data.client_send(b"ok")
            assert await data.client_read() == b"ok"
            assert [s.reset_status for s in (no_port, bad_port, bad_type, dup)] == [3, 3, 3, 3]
    arun(main())


def test_spdy_session_end_closes_pod_connections() -> None:
    async def main() -> None:
        closed = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # until our side closes the connection
            closed.set()
            writer.close()
        pod = Pod()
        await pod.serve(80, silent)
        session = FakeSpdySession()
        served = asyncio.ensure_future(serve_portforward(
            Request(kind="portforward"), SpdyTransport(session, "SPDY/3.1+portforward.k8s.io", tunnelled=True),
            pod.dial, SessionCounters()))
        client_connection(session, 80, 0)
        await asyncio.sleep(0.1)
        await session.client_disconnect()
        await served
        await asyncio.wait_for(closed.wait(), 2)
        pod.close()
    arun(main())


def test_spdy_client_reset_drops_that_connection_only() -> None:
    """client-go resets the data stream on a local error: that pod connection ends, not the others."""
    async def main() -> None:
        async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            await asyncio.sleep(30)  # ignores the EOF, never replies, never closes
        pod = Pod()
        await pod.serve(80, deaf)
        await pod.serve(81, echo)
        async with spdy_forward(Request(kind="portforward"), pod) as (session, served, _c):
            error, data = client_connection(session, 80, 0)
            other_error, other = client_connection(session, 81, 1)
            await data.client_send(b"request")
            await asyncio.sleep(0.05)
            await data.client_reset()
            assert await error.client_read_all() == b""
            assert pod.writers[0].is_closing(), "the reset connection's pod side is closed"
            await other.client_send(b"still here")
            assert await other.client_read() == b"still here"
            assert not served.done()
    arun(main())


def ws_frame(channel: int, data: bytes, b64: bool) -> bytes | str:
    return chr(ord("0") + channel) + base64.b64encode(data).decode() if b64 else bytes((channel,)) + data


def ws_unframe(message: bytes | str, b64: bool) -> tuple[int, bytes]:
    if b64:
        assert isinstance(message, str)
        return ord(message[0]) - ord("0"), base64.b64decode(message[1:])
    assert isinstance(message, bytes)
    return message[0], message[1:]


def run_ws(protocol: str) -> None:
    b64 = "base64" in protocol

    async def main() -> None:
        pod = Pod()
        await pod.serve(80, echo)
        await pod.serve(8080, count_then_reply)
        ws = FakeWebSocket()
        counters = SessionCounters()
        served = asyncio.ensure_future(serve_portforward(
            Request(kind="portforward", pod_id="podW", ports=(80, 8080)),
            WebSocketTransport(ws, protocol, {"port": ["80,8080", "81"]}), pod.dial, counters))
        heads = [ws_unframe(await ws.client_recv(), b64) for _ in range(6)]
        assert heads == [(0, b"\x50\x00"), (1, b"\x50\x00"), (2, b"\x90\x1f"), (3, b"\x90\x1f"),
                         (4, b"\x51\x00"), (5, b"\x51\x00")]
        ws.client_send(ws_frame(0, b"abc", b64))
        ws.client_send(ws_frame(2, b"12345", b64))
        got: dict[int, bytes] = {}
        while got.get(0) != b"abc" or 5 not in got:
            channel, data = ws_unframe(await ws.client_recv(), b64)
            got[channel] = got.get(channel, b"") + data
        assert got[5] == (b"error forwarding port 81 to pod podW, uid : port 81 is not among "
                          b"the ports of the PortForward request (80, 8080)")
        assert not served.done()
        # closing the connection is every upload's EOF: port 8080 replies to its EOF, then all ends
        await ws.client_close()
        await served
        assert sorted(pod.dialed) == [80, 8080], "81 is refused before any dial"
        assert counters.bytes_in == 8
        pod.close()
    arun(main())


def test_websocket_port_channels_binary() -> None:
    run_ws("v4.channel.k8s.io")


def test_websocket_port_channels_base64() -> None:
    run_ws("v4.base64.channel.k8s.io")


def test_websocket_closes_when_every_port_is_done() -> None:
    async def main() -> None:
        async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hello")
            await writer.drain()
            writer.close()
        pod = Pod()
        await pod.serve(80, hello)
        ws = FakeWebSocket()
        served = asyncio.ensure_future(serve_portforward(
            Request(kind="portforward", ports=(80, 9999)), WebSocketTransport(ws, "", {}), pod.dial,
            SessionCounters()))
        await served  # both ports done (one served, one refused by the dial): the server closes
        messages = [ws_unframe(m, False) for m in ws.sent]
        assert (0, b"hello") in messages
        assert any(ch == 3 and data.startswith(b"error forwarding port 9999") for ch, data in messages)
        assert ws.closed and ws.close_code == 1000
        pod.close()
    arun(main())


def test_websocket_bad_port_query_closes() -> None:
    async def main() -> None:
        ws = FakeWebSocket()
        await serve_portforward(Request(kind="portforward"), WebSocketTransport(ws, "", {"port": ["http"]}),
                                Pod().dial, SessionCounters())
        assert ws.closed and ws.sent == []
    arun(main())


def test_real_spdy_session() -> None:
    """Port-forward over a real SpdySession pair, the client doing what client-go's
    handleConnection does; a refused dial on one connection, an echo on two others."""
    async def main() -> None:
        pod = Pod()
        await pod.serve(80, echo)
        counters = SessionCounters()
        async with spdy_pair() as (server, client):
            served = asyncio.ensure_future(serve_portforward(
                Request(kind="portforward", pod_id="podR"), SpdyTransport(server, "portforward.k8s.io"),
                pod.dial, counters))

            async def connection(port: int, request_id: int, payload: bytes) -> tuple[bytes, bytes]:
                headers = {"streamType": "error", "port": str(port), "requestID": str(request_id)}
                error = await client.open_stream(headers)
                await error.close()
                data = await client.open_stream({**headers, "streamType": "data"})
                await data.write(payload)
                await data.close()
                got = await read_all(data)
                data.reset()
                return got, await read_all(error)
            big = os.urandom(300_000)
            results = await asyncio.gather(connection(80, 0, big), connection(9999, 1, b"x"),
                                           connection(80, 2, b"small"))
            assert results[0] == (big, b"")
            assert results[2] == (b"small", b"")
            assert results[1][0] == b""
            assert results[1][1].startswith(b"error forwarding port 9999 to pod podR, uid : ")
            assert counters.bytes_out == len(big) + 5
            assert not served.done()
            await client.close()
            await asyncio.wait_for(served, 5)
        pod.close()
    arun(main())
