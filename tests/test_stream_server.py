"""The stream server's HTTP side with real clients over real sockets: routes and tokens, SPDY and
WebSocket negotiation as the Kubernetes streaming server does it, SPDY tunnelled in WebSocket,
TLS with client certificates and certificate reload, idle timeout, failures, stop()."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from pycrio.cri import api_pb2, api_pb2_grpc
from pycrio.streaming.server import (
    REMOTECOMMAND_SPDY_PROTOCOLS,
    SpdyTransport,
    StreamRequest,
    StreamServer,
    StreamServerConfig,
    WebSocketTransport,
)

EXEC = StreamRequest(kind="exec", container_id="c1", cmd=("echo", "hi"))
ATTACH = StreamRequest(kind="attach", container_id="c1", stdin=True)
PORTFORWARD = StreamRequest(kind="portforward", pod_id="p1", ports=(80,))


# --- a fake SPDY session and an echo handler, on the server's loop -----------------------------


class FakeSpdySession:
    """Stands in for spdy.SpdySession: echoes 5-byte chunks as b"<chunk>" until EOF."""

    instances: list["FakeSpdySession"] = []

    def __init__(self, reader: Any, writer: Any, *, server: bool, idle_timeout: float | None) -> None:
        self.reader, self.writer = reader, writer
        self.server, self.idle_timeout = server, idle_timeout
        self.closed = asyncio.Event()
        self.close_called = False
        FakeSpdySession.instances.append(self)

    async def run(self) -> None:
        try:
            while True:
                chunk = await self.reader.readexactly(5)
                self.writer.write(b"<" + chunk + b">")
                await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()

    async def close(self) -> None:
        self.close_called = True
        self.writer.close()
        self.closed.set()


class EchoHandler:
    """WebSocket: echoes every message (b"boom" raises); SPDY: waits for the session to end."""

    def __init__(self) -> None:
        self.seen: list[tuple[StreamRequest, Any]] = []
        self.lock = threading.Lock()
        self.started = threading.Event()

    async def serve_remotecommand(self, request: StreamRequest, transport: Any) -> None:
        await self._serve(request, transport)

    async def serve_portforward(self, request: StreamRequest, transport: Any) -> None:
        await self._serve(request, transport)

    async def _serve(self, request: StreamRequest, transport: Any) -> None:
        with self.lock:
            self.seen.append((request, transport))
        self.started.set()
        if isinstance(transport, WebSocketTransport):
            while (message := await transport.conn.receive()) is not None:
                if message == b"boom":
                    raise RuntimeError("handler bug")
                await transport.conn.send(message)
        else:
            await transport.session.closed.wait()

    def last(self) -> tuple[StreamRequest, Any]:
        with self.lock:
            return self.seen[-1]


# --- small real clients --------------------------------------------------------------------------


def read_head(sock: socket.socket, timeout: float = 5.0) -> tuple[int, list[tuple[str, str]], bytes]:
    """Read an HTTP response head; (status, headers, bytes after the head)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [(k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:])]
    return status, headers, rest


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k == name.lower()]


def read_to_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def connect(url: str, ssl_ctx: ssl.SSLContext | None = None) -> socket.socket:
    hostport = url.split("://", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    if ssl_ctx is not None:
        sock = ssl_ctx.wrap_socket(sock, server_hostname=host)
    return sock


def path_of(url: str) -> str:
    return "/" + url.split("://", 1)[1].split("/", 1)[1]


def http(url: str, method: str = "GET", headers: dict[str, str] | list[tuple[str, str]] | None = None,
         ssl_ctx: ssl.SSLContext | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
    """One request; (status, headers, body) of a non-upgrade answer, the connection then closed."""
    sock = connect(url, ssl_ctx)
    with sock:
        items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        head = f"{method} {path_of(url)} HTTP/1.1\r\nHost: test\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in items) + "\r\n"
        sock.sendall(head.encode())
        status, got, rest = read_head(sock)
        body = rest + read_to_eof(sock)
        return status, got, body


def spdy_upgrade(url: str, protocols: list[str], method: str = "POST") -> tuple[socket.socket, int, list[tuple[str, str]], bytes]:
    sock = connect(url)
    head = (
        f"{method} {path_of(url)} HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        + "".join(f"X-Stream-Protocol-Version: {p}\r\n" for p in protocols)
        + "\r\n"
    )
    sock.sendall(head.encode())
    status, headers, rest = read_head(sock)
    return sock, status, headers, rest


class WSClient:
    """A blocking WebSocket client over wsproto."""

    def __init__(self, url: str, subprotocols: list[str] | None = None, ssl_ctx: ssl.SSLContext | None = None,
                 extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.sock = connect(url, ssl_ctx)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Any] = []
        self.sock.sendall(self.ws.send(Request(host="test", target=path_of(url),
                                               subprotocols=subprotocols or [],
                                               extra_headers=extra_headers or [])))
        self.accepted: AcceptConnection | None = None
        self.rejected: RejectConnection | None = None
        self.reject_body = b""
        while self.accepted is None and self.rejected is None:
            event = self._next()
            if isinstance(event, AcceptConnection):
                self.accepted = event
            elif isinstance(event, RejectConnection):
                self.rejected = event
                if event.has_body:
                    while True:
                        data = self._next()
                        assert isinstance(data, RejectData)
                        self.reject_body += data.data
                        if data.body_finished:
                            break

    def _next(self, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    def send(self, data: bytes | str) -> None:
        event = TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
        self.sock.sendall(self.ws.send(event))

    def recv(self, timeout: float = 5.0) -> Any:
        """The next message's data (whole), or the event for anything else."""
        parts: list[Any] = []
        while True:
            event = self._next(timeout)
            if isinstance(event, (BytesMessage, TextMessage)):
                parts.append(event.data)
                if event.message_finished:
                    return b"".join(parts) if isinstance(event, BytesMessage) else "".join(parts)
            else:
                return event

    def close(self) -> CloseConnection:
        self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
        while True:
            event = self.recv()
            if isinstance(event, CloseConnection):
                return event

    def shutdown(self) -> None:
        self.sock.close()


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def handler() -> EchoHandler:
    return EchoHandler()


@pytest.fixture
def make_server(handler: EchoHandler) -> Iterator[Any]:
    started: list[StreamServer] = []

    def factory(**overrides: Any) -> StreamServer:
        kwargs = {k: overrides.pop(k) for k in list(overrides) if k in ("session_factory", "head_timeout", "max_message_size")}
        kwargs.setdefault("session_factory", FakeSpdySession)
        server = StreamServer(StreamServerConfig(**overrides), handler, **kwargs)
        server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# --- URLs and tokens -----------------------------------------------------------------------------


def test_base_url_on_a_free_port_and_url_shape(make_server: Any) -> None:
    server = make_server()
    assert server.base_url.startswith("http://127.0.0.1:")
    port = int(server.base_url.rsplit(":", 1)[1])
    assert port > 0
    url = server.url_for(EXEC)
    kind, token = url[len(server.base_url):].split("/")[1:]
    assert kind == "exec" and len(token) >= 43
    assert server.url_for(PORTFORWARD).startswith(server.base_url + "/portforward/")
    with pytest.raises(ValueError):
        server.url_for(StreamRequest(kind="shell"))


def test_bind_failure_raises_oserror(handler: EchoHandler) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        server = StreamServer(StreamServerConfig(port=taken.getsockname()[1]), handler)
        with pytest.raises(OSError):
            server.start()
    assert not [t for t in threading.enumerate() if t.name == "stream-server"]


def test_tokens_unknown_used_expired_and_of_another_kind_get_404(
    make_server: Any, handler: EchoHandler, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server(token_ttl=0.3)
    caplog.set_level(logging.WARNING, logger="pycrio.streaming")
    ws_offer = ["v5.channel.k8s.io"]

    # unknown
    status, headers, body = http(server.base_url + "/exec/not-a-token")
    assert status == 404 and body == b"404 page not found\n"
    assert "unknown, used or expired token" in caplog.text and "127.0.0.1:" in caplog.text

    # used: the first request takes it, the second gets 404
    url = server.url_for(EXEC)
    client = WSClient(url, ws_offer)
    assert client.accepted is not None
    client.close()
    client.shutdown()
    again = WSClient(url, ws_offer)
    assert again.rejected is not None and again.rejected.status_code == 404
    again.shutdown()

    # expired
    url = server.url_for(EXEC)
    time.sleep(0.4)
    assert http(url)[0] == 404

    # a token for exec presented on /attach (and then gone for /exec too, as k8s consumes first)
    url = server.url_for(EXEC)
    caplog.clear()
    assert http(url.replace("/exec/", "/attach/"))[0] == 404
    assert "a token for exec" in caplog.text
    assert http(url)[0] == 404
    assert handler.seen and len(handler.seen) == 1


def test_routes_and_methods(make_server: Any) -> None:
    server = make_server()
    assert http(server.base_url + "/")[0] == 404
    assert http(server.base_url + "/exec")[0] == 404
    assert http(server.base_url + "/exec/a/b")[0] == 404
    assert http(server.base_url + "/run/abc")[0] == 404
    url = server.url_for(EXEC)
    status, headers, _ = http(url, method="PUT")
    assert status == 405 and values(headers, "allow") == ["GET, POST"]
    # the 405 did not consume it; a plain GET without any upgrade is a 400 (k8s: no
    # X-Stream-Protocol-Version) and consumes it
    status, _, body = http(url)
    assert status == 400
    assert b"unable to upgrade: header X-Stream-Protocol-Version does not exist in request with 0 headers" in body
    assert http(url)[0] == 404


def test_oversized_and_stalled_request_heads(make_server: Any) -> None:
    server = make_server(head_timeout=0.3)
    status, _, _ = http(server.base_url + "/exec/x", headers={"X-Big": "a" * 70_000})
    assert status == 431
    sock = connect(server.base_url)
    with sock:
        sock.sendall(b"GET /exec/x HTTP/1.1\r\n")  # never finishes its head
        start = time.monotonic()
        assert read_to_eof(sock) == b""
        assert time.monotonic() - start < 3
    status, _, _ = http(server.base_url + "/exec/x", headers=[("Bad Header", "x")])
    assert status == 400


# --- SPDY negotiation ----------------------------------------------------------------------------


def test_spdy_upgrade_picks_the_clients_first_supported_protocol(make_server: Any, handler: EchoHandler) -> None:
    server = make_server(idle_timeout=123.0)
    # what crictl (client-go's SPDY executor) offers, in its order
    offer = ["v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]
    sock, status, headers, rest = spdy_upgrade(server.url_for(EXEC), offer)
    with sock:
        assert status == 101
        assert values(headers, "connection") == ["Upgrade"]
        assert values(headers, "upgrade") == ["SPDY/3.1"]
        assert values(headers, "x-stream-protocol-version") == ["v4.channel.k8s.io"]
        # bytes after the 101 are the session's, across chunk boundaries
        sock.sendall(b"hel")
        sock.sendall(b"loworld")
        got = rest
        while len(got) < 14:
            got += sock.recv(100)
        assert got == b"<hello><world>"
        request, transport = handler.last()
        assert request == EXEC
        assert isinstance(transport, SpdyTransport)
        assert transport.protocol == "v4.channel.k8s.io" and not transport.tunnelled
        session = FakeSpdySession.instances[-1]
        assert session.server is True and session.idle_timeout == 123.0
        assert server.active_sessions() == {"exec": 1, "attach": 0, "portforward": 0}
    wait_for(lambda: server.active_sessions()["exec"] == 0)

    # an older client: header lines and comma lists both count
    sock, status, headers, _ = spdy_upgrade(server.url_for(ATTACH), ["v9.channel.k8s.io, v3.channel.k8s.io", "v2.channel.k8s.io"], method="GET")
    with sock:
        assert status == 101 and values(headers, "x-stream-protocol-version") == ["v3.channel.k8s.io"]

    sock, status, headers, _ = spdy_upgrade(server.url_for(PORTFORWARD), ["portforward.k8s.io"])
    with sock:
        assert status == 101 and values(headers, "x-stream-protocol-version") == ["portforward.k8s.io"]
        wait_for(lambda: handler.last()[1].protocol == "portforward.k8s.io")


def test_spdy_refusals_as_kubernetes_words_them(make_server: Any) -> None:
    server = make_server()
    sock, status, headers, rest = spdy_upgrade(server.url_for(EXEC), ["v9.channel.k8s.io", "v8.channel.k8s.io"])
    with sock:
        body = rest + read_to_eof(sock)
    assert status == 403
    assert values(headers, "x-accepted-stream-protocol-versions") == REMOTECOMMAND_SPDY_PROTOCOLS
    assert body == (
        b"unable to upgrade: unable to negotiate protocol: client supports [v9.channel.k8s.io v8.channel.k8s.io],"
        b" server accepts [v4.channel.k8s.io v3.channel.k8s.io v2.channel.k8s.io channel.k8s.io]\n"
    )
    assert values(headers, "content-type") == ["text/plain; charset=utf-8"]

    sock, status, headers, _ = spdy_upgrade(server.url_for(PORTFORWARD), ["v4.channel.k8s.io"])
    sock.close()
    assert status == 403 and values(headers, "x-accepted-stream-protocol-versions") == ["portforward.k8s.io"]

    # a protocol offer without the upgrade headers
    status, _, body = http(server.url_for(EXEC), method="POST", headers={"X-Stream-Protocol-Version": "v4.channel.k8s.io"})
    assert status == 400 and body.startswith(b"unable to upgrade: missing upgrade headers in request")
    # an empty offer
    status, _, body = http(server.url_for(EXEC), headers={"X-Stream-Protocol-Version": " "})
    assert status == 400 and b"but no valid protocols" in body


# --- WebSocket -----------------------------------------------------------------------------------


def test_websocket_subprotocol_choice_echo_ping_and_close(make_server: Any, handler: EchoHandler) -> None:
    server = make_server()
    # crictl's websocket executor offers only v5
    client = WSClient(server.url_for(EXEC), ["v5.channel.k8s.io"])
    assert client.accepted is not None and client.accepted.subprotocol == "v5.channel.k8s.io"
    client.send(b"\x00stdin bytes")
    assert client.recv() == b"\x00stdin bytes"
    client.send("3text")
    assert client.recv() == "3text"
    big = os.urandom(300_000)
    client.send(big)
    assert client.recv() == big
    client.sock.sendall(client.ws.send(Ping(payload=b"beat")))
    pong = client.recv()
    assert isinstance(pong, Pong) and pong.payload == b"beat"
    request, transport = handler.last()
    assert isinstance(transport, WebSocketTransport) and transport.protocol == "v5.channel.k8s.io"
    assert request == EXEC
    closed = client.close()
    assert closed.code == 1000
    assert read_to_eof(client.sock) == b""  # the server closes the socket after the handshake
    client.shutdown()

    # the client's order of preference wins; unknown offers are skipped
    client = WSClient(server.url_for(ATTACH), ["x.k8s.io", "v4.base64.channel.k8s.io", "v5.channel.k8s.io"])
    assert client.accepted is not None and client.accepted.subprotocol == "v4.base64.channel.k8s.io"
    client.shutdown()

    # no offer at all: accepted without a subprotocol, binary channels (channel.k8s.io)
    client = WSClient(server.url_for(EXEC), [])
    assert client.accepted is not None and client.accepted.subprotocol is None
    wait_for(lambda: handler.last()[1].protocol == "channel.k8s.io")
    client.shutdown()

    # nothing in common: 403
    client = WSClient(server.url_for(EXEC), ["v9.channel.k8s.io"])
    assert client.rejected is not None and client.rejected.status_code == 403
    client.shutdown()


def test_websocket_handshake_errors(make_server: Any) -> None:
    server = make_server()
    base = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13", "Sec-WebSocket-Protocol": "v4.channel.k8s.io"}
    status, _, _ = http(server.url_for(EXEC), method="POST", headers=base)
    assert status == 405
    status, headers, _ = http(server.url_for(EXEC), headers={**base, "Sec-WebSocket-Version": "8"})
    assert status == 400 and values(headers, "sec-websocket-version") == ["13"]
    no_key = {k: v for k, v in base.items() if k != "Sec-WebSocket-Key"}
    assert http(server.url_for(EXEC), headers=no_key)[0] == 400


def test_websocket_portforward_passes_the_query(make_server: Any, handler: EchoHandler) -> None:
    server = make_server()
    client = WSClient(server.url_for(PORTFORWARD) + "?port=80&port=8080", ["v4.channel.k8s.io"])
    assert client.accepted is not None and client.accepted.subprotocol == "v4.channel.k8s.io"
    client.send(b"\x00x")
    assert client.recv() == b"\x00x"
    request, transport = handler.last()
    assert request == PORTFORWARD
    assert transport.query == {"port": ["80", "8080"]} and transport.protocol == "v4.channel.k8s.io"
    client.shutdown()
    # remotecommand protocols are not port-forward ones
    client = WSClient(server.url_for(PORTFORWARD), ["v5.channel.k8s.io"])
    assert client.rejected is not None and client.rejected.status_code == 403
    client.shutdown()


def test_websocket_message_size_bound(make_server: Any) -> None:
    server = make_server(max_message_size=1000)
    client = WSClient(server.url_for(EXEC), ["v4.channel.k8s.io"])
    client.send(b"a" * 1000)
    assert client.recv() == b"a" * 1000
    client.send(b"a" * 1001)
    event = client.recv()
    assert isinstance(event, CloseConnection) and event.code == 1009
    client.shutdown()


def test_spdy_tunnelled_in_websocket(make_server: Any, handler: EchoHandler) -> None:
    """crictl port-forward --transport websocket: client-go's tunneling dialer."""
    server = make_server()
    client = WSClient(server.url_for(PORTFORWARD), ["SPDY/3.1+portforward.k8s.io"])
    assert client.accepted is not None and client.accepted.subprotocol == "SPDY/3.1+portforward.k8s.io"
    # message boundaries mean nothing inside the tunnel
    client.send(b"ab")
    client.send(b"cdefghij")
    got = b""
    while len(got) < 14:
        message = client.recv()
        assert isinstance(message, bytes)  # the session's writes come back as binary messages
        got += message
    assert got == b"<abcde><fghij>"
    request, transport = handler.last()
    assert isinstance(transport, SpdyTransport)
    assert transport.tunnelled and transport.protocol == "portforward.k8s.io" and request == PORTFORWARD
    # a text message is not SPDY: the session ends, the connection closes
    client.send("text")
    wait_for(lambda: FakeSpdySession.instances[-1].closed.is_set())
    wait_for(lambda: server.active_sessions()["portforward"] == 0)
    client.shutdown()

    # a normal close of the tunnel ends the session too
    client = WSClient(server.url_for(PORTFORWARD), ["SPDY/3.1+portforward.k8s.io"])
    client.send(b"12345")
    assert client.recv() == b"<12345>"
    assert client.close().code == 1000
    wait_for(lambda: server.active_sessions()["portforward"] == 0)
    client.shutdown()

    # a tunnelled protocol the server does not speak: the SPDY refusal, as the apiserver relays it
    client = WSClient(server.url_for(PORTFORWARD), ["SPDY/3.1+v9.portforward.k8s.io"])
    assert client.rejected is not None and client.rejected.status_code == 403
    assert (b"X-Accepted-Stream-Protocol-Versions", b"portforward.k8s.io") in [
        (k.title(), v) for k, v in client.rejected.headers
    ] or (b"x-accepted-stream-protocol-versions", b"portforward.k8s.io") in list(client.rejected.headers)
    assert b"unable to negotiate protocol" in client.reject_body
    client.shutdown()


# --- robustness ----------------------------------------------------------------------------------


def test_handler_exception_closes_only_that_connection(make_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = make_server()
    caplog.set_level(logging.ERROR, logger="pycrio.streaming")
    client = WSClient(server.url_for(EXEC), ["v4.channel.k8s.io"])
    client.send(b"boom")
    event = client.recv()
    assert isinstance(event, CloseConnection) and event.code == 1011
    client.shutdown()
    assert "handler bug" in caplog.text
    wait_for(lambda: server.active_sessions()["exec"] == 0)
    client = WSClient(server.url_for(EXEC), ["v4.channel.k8s.io"])
    client.send(b"still here")
    assert client.recv() == b"still here"
    client.shutdown()


def test_idle_timeout_closes_a_silent_connection_only(make_server: Any) -> None:
    server = make_server(idle_timeout=0.5)
    silent = WSClient(server.url_for(EXEC), ["v4.channel.k8s.io"])
    busy = WSClient(server.url_for(EXEC), ["v4.channel.k8s.io"])
    start = time.monotonic()
    while time.monotonic() - start < 1.2:
        busy.send(b"tick")
        assert busy.recv() == b"tick"
        time.sleep(0.1)
    silent.sock.settimeout(2)
    assert silent.sock.recv(100) == b""  # closed by the server
    assert 0.4 < time.monotonic() - start
    busy.send(b"still open")
    assert busy.recv() == b"still open"
    wait_for(lambda: server.active_sessions()["exec"] == 1)
    silent.shutdown()
    busy.shutdown()

    # an idle SPDY connection too
    sock, status, _, _ = spdy_upgrade(server.url_for(EXEC), ["v4.channel.k8s.io"])
    with sock:
        assert status == 101
        assert read_to_eof(sock, timeout=3) == b""
    wait_for(lambda: server.active_sessions()["exec"] == 0)


def test_stop_closes_live_sessions_and_joins_the_thread(handler: EchoHandler) -> None:
    server = StreamServer(StreamServerConfig(), handler, session_factory=FakeSpdySession)
    server.start()
    loop = server.loop
    ws = WSClient(server.url_for(EXEC), ["v4.channel.k8s.io"])
    sock, status, _, _ = spdy_upgrade(server.url_for(PORTFORWARD), ["portforward.k8s.io"])
    assert status == 101
    wait_for(lambda: server.active_sessions() == {"exec": 1, "attach": 0, "portforward": 1})
    idle_tcp = socket.create_connection(("127.0.0.1", int(server.base_url.rsplit(":", 1)[1])))
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 5
    assert not [t for t in threading.enumerate() if t.name == "stream-server"]
    assert loop is not None and loop.is_closed()
    assert server.active_sessions() == {"exec": 0, "attach": 0, "portforward": 0}
    for s in (ws.sock, sock, idle_tcp):
        s.settimeout(2)
        try:
            assert s.recv(65536) in (b"",) or read_to_eof(s) == b""
        except ConnectionResetError:
            pass
        s.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(server.base_url.rsplit(":", 1)[1])), timeout=1)
    server.stop()  # twice is fine


# --- TLS -----------------------------------------------------------------------------------------


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(crt), "-days", "1", "-subj", f"/CN={name}")
    return crt, key


def make_cert(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, csr, crt, extfile = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt", d / f"{name}.ext"
    extfile.write_text(ext + "\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-out", str(crt), "-days", "1", "-extfile", str(extfile))
    return crt, key


def client_context(ca: Path, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def replace_file(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_tls_with_client_certificates_and_reload(tmp_path: Path, make_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    ca = make_ca(tmp_path, "ca")
    server_pair = make_cert(tmp_path, "server1", ca, "subjectAltName=IP:127.0.0.1")
    client_pair = make_cert(tmp_path, "client", ca, "extendedKeyUsage=clientAuth")
    live_crt, live_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    replace_file(live_crt, server_pair[0].read_bytes())
    replace_file(live_key, server_pair[1].read_bytes())
    server = make_server(tls_cert=str(live_crt), tls_key=str(live_key), tls_ca=str(ca[0]))
    assert server.base_url.startswith("https://127.0.0.1:")
    good = client_context(ca[0], client_pair)

    # a whole WebSocket session over TLS with a client certificate
    client = WSClient(server.url_for(EXEC), ["v5.channel.k8s.io"], ssl_ctx=good)
    assert client.accepted is not None
    client.send(b"\x00over tls")
    assert client.recv() == b"\x00over tls"
    assert isinstance(client.sock, ssl.SSLSocket)
    assert client.sock.getpeercert(binary_form=True) == der(server_pair[0])
    client.shutdown()

    # no client certificate: refused in the handshake (or right after it, with TLS 1.3)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with connect(server.base_url, client_context(ca[0], None)) as sock:
            sock.sendall(b"GET /exec/x HTTP/1.1\r\nHost: t\r\n\r\n")
            if not sock.recv(100):
                raise ConnectionError("closed")

    # a rotated certificate takes effect for the next connection, no restart
    server_pair2 = make_cert(tmp_path, "server2", ca, "subjectAltName=IP:127.0.0.1")
    replace_file(live_key, server_pair2[1].read_bytes())
    replace_file(live_crt, server_pair2[0].read_bytes())
    status, _, _ = http(server.base_url + "/exec/x", ssl_ctx=good)
    assert status == 404
    sock = connect(server.base_url, good)
    assert isinstance(sock, ssl.SSLSocket) and sock.getpeercert(binary_form=True) == der(server_pair2[0])
    sock.close()

    # a broken rewrite keeps the last good certificate
    caplog.set_level(logging.WARNING, logger="pycrio.streaming")
    replace_file(live_crt, b"not a certificate\n")
    sock = connect(server.base_url, good)
    assert isinstance(sock, ssl.SSLSocket) and sock.getpeercert(binary_form=True) == der(server_pair2[0])
    sock.close()
    assert "keeping the loaded certificate" in caplog.text


def test_tls_setup_errors_raise_at_start(tmp_path: Path, handler: EchoHandler) -> None:
    with pytest.raises(ValueError):
        StreamServer(StreamServerConfig(tls_cert=str(tmp_path / "a.crt")), handler).start()
    with pytest.raises(OSError):
        StreamServer(StreamServerConfig(tls_cert=str(tmp_path / "a.crt"), tls_key=str(tmp_path / "a.key")), handler).start()
    bad = tmp_path / "bad.pem"
    bad.write_text("garbage")
    with pytest.raises(OSError):  # ssl.SSLError is an OSError
        StreamServer(StreamServerConfig(tls_cert=str(bad), tls_key=str(bad)), handler).start()
    assert not [t for t in threading.enumerate() if t.name == "stream-server"]


# --- with the real SPDY session (spdy.py) ----------------------------------------------------------


class SpdyEchoHandler:
    """Echoes every stream the client opens, upper-cased, then half-closes it."""

    def __init__(self) -> None:
        self.transports: list[SpdyTransport] = []

    async def serve_remotecommand(self, request: StreamRequest, transport: Any) -> None:
        await self.serve_portforward(request, transport)

    async def serve_portforward(self, request: StreamRequest, transport: Any) -> None:
        self.transports.append(transport)
        while (stream := await transport.session.accept()) is not None:
            asyncio.get_running_loop().create_task(self._echo(stream))

    @staticmethod
    async def _echo(stream: Any) -> None:
        while data := await stream.read():
            await stream.write(data.upper())
        await stream.close()


class AsyncWSClientTunnel:
    """Client side of a WebSocket carrying SPDY bytes: readexactly/write/drain/close for a session."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws: WSConnection) -> None:
        self.reader, self.writer, self.ws = reader, writer, ws
        self.buffer = bytearray()

    async def readexactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = await self.reader.read(65536)
            if not data:
                raise asyncio.IncompleteReadError(bytes(self.buffer), n)
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, BytesMessage):
                    self.buffer += event.data
                elif isinstance(event, CloseConnection):
                    raise asyncio.IncompleteReadError(bytes(self.buffer), n)
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def write(self, data: bytes) -> None:
        self.writer.write(self.ws.send(BytesMessage(data=data)))

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


def test_real_spdy_session_direct_and_tunnelled() -> None:
    pytest.importorskip("pycrio.streaming.spdy")
    from pycrio.streaming.spdy import SpdySession

    handler = SpdyEchoHandler()
    server = StreamServer(StreamServerConfig(idle_timeout=30), handler)
    server.start()
    host, port = "127.0.0.1", int(server.base_url.rsplit(":", 1)[1])

    async def roundtrip(session: SpdySession) -> list[bytes]:
        runner = asyncio.create_task(session.run())
        out = []
        for n in range(3):  # concurrent streams, as port-forward's data/error pairs
            stream = await session.open_stream({"streamType": "data", "port": "80", "requestID": str(n)})
            await stream.write(b"hello %d" % n)
            out.append(await stream.read())
            await stream.close()
            assert await stream.read() == b""  # the server's FIN
        await session.close()
        await asyncio.wait_for(runner, 5)
        return out

    async def direct() -> list[bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        url = server.url_for(PORTFORWARD)
        writer.write(
            f"POST {path_of(url)} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            "X-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        try:
            return await roundtrip(SpdySession(reader, writer, server=False))
        finally:
            writer.close()

    async def tunnelled() -> list[bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        ws = WSConnection(ConnectionType.CLIENT)
        url = server.url_for(PORTFORWARD)
        writer.write(ws.send(Request(host=host, target=path_of(url), subprotocols=["SPDY/3.1+portforward.k8s.io"])))
        accepted = None
        while accepted is None:
            ws.receive_data(await reader.read(65536))
            accepted = next((e for e in ws.events() if isinstance(e, AcceptConnection)), None)
        assert accepted.subprotocol == "SPDY/3.1+portforward.k8s.io"
        tunnel = AsyncWSClientTunnel(reader, writer, ws)
        try:
            return await roundtrip(SpdySession(tunnel, tunnel, server=False))
        finally:
            writer.close()

    try:
        expected = [b"HELLO 0", b"HELLO 1", b"HELLO 2"]
        assert asyncio.run(direct()) == expected
        assert asyncio.run(tunnelled()) == expected
        assert [(t.protocol, t.tunnelled) for t in handler.transports] == [
            ("portforward.k8s.io", False),
            ("portforward.k8s.io", True),
        ]
        wait_for(lambda: server.active_sessions()["portforward"] == 0)
    finally:
        server.stop()


# --- the real crictl (client-go's SPDY, WebSocket and tunnelling clients) ---------------------------


class FakeCRI(api_pb2_grpc.RuntimeServiceServicer, api_pb2_grpc.ImageServiceServicer):
    """Just enough CRI for crictl exec/port-forward: the URLs come from the stream server."""

    def __init__(self, server: StreamServer) -> None:
        self.server = server

    def Version(self, request: Any, context: Any) -> Any:
        return api_pb2.VersionResponse(version="0.1.0", runtime_name="fake", runtime_version="0", runtime_api_version="v1")

    def ImageFsInfo(self, request: Any, context: Any) -> Any:
        return api_pb2.ImageFsInfoResponse()

    def Exec(self, request: Any, context: Any) -> Any:
        req = StreamRequest(kind="exec", container_id=request.container_id, cmd=tuple(request.cmd), tty=request.tty,
                            stdin=request.stdin, stdout=request.stdout, stderr=request.stderr)
        return api_pb2.ExecResponse(url=self.server.url_for(req))

    def PortForward(self, request: Any, context: Any) -> Any:
        req = StreamRequest(kind="portforward", pod_id=request.pod_sandbox_id, ports=tuple(request.port))
        return api_pb2.PortForwardResponse(url=self.server.url_for(req))


class ProtocolHandler:
    """The real remotecommand/port-forward protocol layer over the transports this server gives."""

    def __init__(self, echo_port: int) -> None:
        self.echo_port = echo_port
        self.protocols: list[tuple[str, bool]] = []

    async def serve_remotecommand(self, request: StreamRequest, transport: Any) -> None:
        from pycrio.streaming.remotecommand import serve_remotecommand
        from pycrio.streaming.session import ExecOutcome

        self.protocols.append((transport.protocol, isinstance(transport, WebSocketTransport)))

        async def run(io: Any) -> Any:
            data = b""
            if request.stdin:
                while chunk := await io.read_stdin():
                    data += chunk
            await io.write_stdout(b"out:" + " ".join(request.cmd).encode() + b":" + data + b"\n")
            await io.write_stderr(b"err\n")
            return ExecOutcome(exit_code=3)

        await serve_remotecommand(request, transport, run)

    async def serve_portforward(self, request: StreamRequest, transport: Any) -> None:
        from pycrio.streaming.portforward import serve_portforward
        from pycrio.streaming.session import SessionCounters

        self.protocols.append((transport.protocol, getattr(transport, "tunnelled", False)))

        async def dial(port: int) -> Any:
            return await asyncio.open_connection("127.0.0.1", self.echo_port)

        await serve_portforward(request, transport, dial, SessionCounters())


@pytest.fixture
def echo_port() -> Iterator[int]:
    import socketserver

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while data := self.request.recv(65536):
                self.request.sendall(data)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def fake_cri(tmp_path: Path) -> Iterator[tuple[str, FakeCRI]]:
    """A CRI endpoint for crictl; point its `server` at the stream server under test."""
    import grpc
    from concurrent.futures import ThreadPoolExecutor

    grpc_server = grpc.server(ThreadPoolExecutor(4))
    cri = FakeCRI(None)  # type: ignore[arg-type]
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(cri, grpc_server)  # type: ignore[arg-type]
    api_pb2_grpc.add_ImageServiceServicer_to_server(cri, grpc_server)  # type: ignore[arg-type]
    endpoint = f"unix://{tmp_path}/cri.sock"
    grpc_server.add_insecure_port(endpoint)
    grpc_server.start()
    yield endpoint, cri
    grpc_server.stop(0)


def crictl_path() -> str:
    from tests.harness import tool

    try:
        return tool("crictl")
    except RuntimeError:
        pytest.skip("crictl not built (make install)")


EXIT3 = "command terminated with exit code 3"  # crictl v1.37 itself exits 1, saying so


def crictl(endpoint: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [crictl_path(), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint, "--timeout", "10s", *args]
    return subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=30)


def test_real_crictl_exec_over_spdy_websocket_and_tls(tmp_path: Path, fake_cri: Any, echo_port: int) -> None:
    pytest.importorskip("pycrio.streaming.remotecommand")
    endpoint, cri = fake_cri
    handler = ProtocolHandler(echo_port)
    cri.server = server = StreamServer(StreamServerConfig(), handler)
    server.start()
    try:
        spdy = crictl(endpoint, "exec", "c1", "sh", "-c", "x")
        assert spdy.stdout == "out:sh -c x:\n" and EXIT3 in spdy.stderr, spdy.stderr
        assert "err\n" in spdy.stderr
        piped = crictl(endpoint, "exec", "-i", "c1", "cat", input="hello\n")
        assert piped.stdout == "out:cat:hello\n\n" and EXIT3 in piped.stderr, piped.stderr
        ws = crictl(endpoint, "exec", "--transport", "websocket", "-i", "c1", "cat", input="ws in\n")
        assert ws.stdout == "out:cat:ws in\n\n" and EXIT3 in ws.stderr, ws.stderr
        assert handler.protocols == [("v4.channel.k8s.io", False), ("v4.channel.k8s.io", False),
                                     ("v5.channel.k8s.io", True)]
    finally:
        server.stop()

    # TLS with client certificates required: crictl's --tls-* flags
    ca = make_ca(tmp_path, "ca")
    server_pair = make_cert(tmp_path, "server", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1")
    client_pair = make_cert(tmp_path, "client", ca, "extendedKeyUsage=clientAuth")
    cri.server = server = StreamServer(
        StreamServerConfig(tls_cert=str(server_pair[0]), tls_key=str(server_pair[1]), tls_ca=str(ca[0])), handler
    )
    server.start()
    try:
        tls = ["--tls-ca", str(ca[0]), "--tls-cert", str(client_pair[0]), "--tls-key", str(client_pair[1])]
        for transport in ("spdy", "websocket"):
            got = crictl(endpoint, "exec", "--transport", transport, *tls, "c1", "id")
            assert got.stdout == "out:id:\n" and EXIT3 in got.stderr, got.stderr
        refused = crictl(endpoint, "exec", "c1", "id")  # no client certificate
        assert refused.returncode != 0 and "out:" not in refused.stdout
    finally:
        server.stop()


def test_real_crictl_port_forward_over_spdy_and_websocket_tunnel(fake_cri: Any, echo_port: int) -> None:
    pytest.importorskip("pycrio.streaming.portforward")
    from tests.registry_fixture import free_port

    endpoint, cri = fake_cri
    handler = ProtocolHandler(echo_port)
    cri.server = server = StreamServer(StreamServerConfig(), handler)
    server.start()
    try:
        for transport in ("spdy", "websocket"):
            local = free_port()
            proc = subprocess.Popen(
                [crictl_path(), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint,
                 "port-forward", "--transport", transport, "pod1", f"{local}:80"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            try:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        conn = socket.create_connection(("127.0.0.1", local), timeout=5)
                        break
                    except OSError:
                        assert proc.poll() is None, proc.communicate()
                        assert time.monotonic() < deadline
                        time.sleep(0.05)
                with conn:
                    payload = os.urandom(200_000)
                    conn.sendall(payload)
                    got = b""
                    while len(got) < len(payload):
                        chunk = conn.recv(65536)
                        assert chunk
                        got += chunk
                    assert got == payload
            finally:
                proc.terminate()
                proc.communicate(timeout=10)
        assert handler.protocols == [("portforward.k8s.io", False), ("portforward.k8s.io", True)]
        wait_for(lambda: server.active_sessions()["portforward"] == 0)
    finally:
        server.stop()
