"""The stream server: the HTTP endpoint the Exec, Attach and PortForward URLs point at.

As the Kubernetes CRI streaming server (k8s.io/cri-streaming pkg/streaming/server.go), which
CRI-O and containerd embed: `url_for` stores a validated request under a single-use token
(tokens.py) and returns `<base_url>/<kind>/<token>`; a client then upgrades that URL to

- SPDY/3.1 (`Upgrade: SPDY/3.1`, the protocol chosen from `X-Stream-Protocol-Version`),
- WebSocket (`Upgrade: websocket`, the channel protocol chosen from `Sec-WebSocket-Protocol`),
- or, for port-forward, SPDY tunnelled in WebSocket binary messages (`SPDY/3.1+portforward.k8s.io`,
  crictl's `--transport websocket`, served as kubelet does with the apiserver's TunnelingHandler),

and the handler (the remotecommand / port-forward protocols) gets the upgraded transport. The
server runs an asyncio loop in its own thread, so a long `exec -it` holds no gRPC worker.
Optional TLS: the certificate, key and client CA are re-read when their files change (checked as
each connection arrives, TLS started per connection), so a rotated certificate needs no restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Union

from pycrio.streaming.http import (
    HEAD_TIMEOUT,
    MAX_HEAD,
    HTTPError,
    HTTPRequest,
    error_response,
    read_request_head,
    response_head,
)
from pycrio.streaming.tokens import MAX_IN_FLIGHT, RequestCache
from pycrio.streaming.websocket import (
    CLOSE_INTERNAL_ERROR,
    MAX_MESSAGE_SIZE,
    WebSocketConnection,
    accept_websocket,
    check_handshake,
    is_websocket_request,
    negotiate_subprotocol,
    offered_subprotocols,
    tunnel_streams,
)

if TYPE_CHECKING:
    from pycrio.streaming.spdy import SpdySession

log = logging.getLogger("pycrio.streaming")

KINDS = ("exec", "attach", "portforward")

# k8s.io/cri-streaming remotecommand.SupportedStreamingProtocols (its SPDY list has no v5: crictl
# offers v5 first and gets v4, as with CRI-O and containerd; client-go runs v5 over SPDY as v4).
REMOTECOMMAND_SPDY_PROTOCOLS = ["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]
# k8s.io/cri-streaming portforward.SupportedProtocols
PORTFORWARD_SPDY_PROTOCOLS = ["portforward.k8s.io"]
# remotecommand/websocket.go's protocols plus v5 (crictl's websocket executor offers only v5).
# "" is a client that offers none: binary channels, as channel.k8s.io.
REMOTECOMMAND_WS_PROTOCOLS = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
    "",
]
# portforward/websocket.go's protocols ("" is binary, as v4.channel.k8s.io)
PORTFORWARD_WS_PROTOCOLS = ["v4.channel.k8s.io", "v4.base64.channel.k8s.io", ""]
TUNNEL_PREFIX = "SPDY/3.1+"  # k8s portforward.WebsocketsSPDYTunnelingPrefix
TUNNEL_SUFFIX = ".k8s.io"

TLS_HANDSHAKE_TIMEOUT = 10.0
SHUTDOWN_GRACE = 2.0  # seconds a handler gets to end after its connection was closed under it


@dataclass
class StreamServerConfig:
    address: str = "127.0.0.1"
    port: int = 0  # 0: a free port (see base_url)
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""  # set: client certificates signed by it are required
    idle_timeout: float = 4 * 3600  # no bytes either way for this long: connection closed
    token_ttl: float = 60.0
    stream_creation_timeout: float = 30.0


@dataclass(frozen=True)
class StreamRequest:
    """What an Exec/Attach/PortForward RPC validated, kept under the URL's token."""

    kind: str  # "exec" | "attach" | "portforward"
    container_id: str = ""
    pod_id: str = ""
    cmd: tuple[str, ...] = ()
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True
    ports: tuple[int, ...] = ()
    links: tuple = ()  # opentelemetry SpanContext(s) of the RPC span, for the session span link
    trace_carrier: dict = field(default_factory=dict)  # W3C carrier of the RPC span


@dataclass
class SpdyTransport:
    """SPDY/3.1, directly or tunnelled in a WebSocket; the session already runs."""

    session: SpdySession
    protocol: str  # the chosen X-Stream-Protocol-Version
    tunnelled: bool = False


@dataclass
class WebSocketTransport:
    conn: WebSocketConnection
    protocol: str  # the chosen subprotocol ("" offers are reported as their binary equivalent)
    query: dict[str, list[str]] = field(default_factory=dict)  # ?port=N&port=M for port-forward


Transport = Union[SpdyTransport, WebSocketTransport]


class StreamHandler(Protocol):
    async def serve_remotecommand(self, request: StreamRequest, transport: Transport) -> None: ...
    async def serve_portforward(self, request: StreamRequest, transport: Transport) -> None: ...


SessionFactory = Callable[..., "SpdySession"]


def _spdy_session(reader: Any, writer: Any, *, server: bool, idle_timeout: float | None) -> SpdySession:
    from pycrio.streaming.spdy import SpdySession

    return SpdySession(reader, writer, server=server, idle_timeout=idle_timeout)


# --- SPDY negotiation (k8s.io/streaming httpstream.Handshake and spdy.UpgradeResponse) ------------


def _go_list(values: list[str]) -> str:
    return "[" + " ".join(values) + "]"


def negotiate_spdy_protocol(req: HTTPRequest, server_protocols: list[str]) -> str:
    """The first of the client's X-Stream-Protocol-Version offers the server accepts, or
    HTTPError: 400 without offers, 403 with X-Accepted-Stream-Protocol-Versions when none fits."""
    if not req.has_header("x-stream-protocol-version"):
        count = len({name for name, _ in req.headers if name != "host"})
        raise HTTPError(
            400,
            f"unable to upgrade: header X-Stream-Protocol-Version does not exist in request with {count} headers",
        )
    client = req.header_tokens("x-stream-protocol-version")
    if not client:
        raise HTTPError(
            400,
            "unable to upgrade: header X-Stream-Protocol-Version contains "
            f"{_go_list(req.header_values('x-stream-protocol-version'))}, but no valid protocols",
        )
    return _negotiate(client, server_protocols)


def _negotiate(client: list[str], server_protocols: list[str]) -> str:
    for protocol in client:
        if protocol in server_protocols:
            return protocol
    raise HTTPError(
        403,
        f"unable to upgrade: unable to negotiate protocol: client supports {_go_list(client)}, "
        f"server accepts {_go_list(server_protocols)}",
        [("X-Accepted-Stream-Protocol-Versions", p) for p in server_protocols],
    )


def check_spdy_upgrade(req: HTTPRequest) -> None:
    connection = (req.header("connection") or "").lower()
    upgrade = (req.header("upgrade") or "").lower()
    if "upgrade" not in connection or "spdy/3.1" not in upgrade:
        shown = {name: req.header_values(name) for name, _ in req.headers}
        raise HTTPError(400, f"unable to upgrade: missing upgrade headers in request: {shown}")


def spdy_upgrade_response(protocol: str) -> bytes:
    return response_head(
        101,
        [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", protocol)],
    )


def tunnel_protocols(req: HTTPRequest) -> list[str]:
    """The SPDY protocols a WebSocket request asks to tunnel (`SPDY/3.1+<protocol>.k8s.io`)."""
    return [
        p[len(TUNNEL_PREFIX):]
        for p in offered_subprotocols(req)
        if p.startswith(TUNNEL_PREFIX) and p.endswith(TUNNEL_SUFFIX)
    ]


# --- TLS with reloading ---------------------------------------------------------------------------


class _TLSFiles:
    """The server's SSL context, rebuilt when the cert, key or CA file changes (size, mtime, inode).

    A rebuild that fails (a half-written pair during a rotation) keeps the previous context and is
    retried when the files change again."""

    def __init__(self, cert: str, key: str, ca: str) -> None:
        self.paths = [p for p in (cert, key, ca) if p]
        self.cert, self.key, self.ca = cert, key, ca
        self._context: ssl.SSLContext | None = None
        self._stamp: tuple | None = None
        self._failed: tuple | None = None

    def _stamps(self) -> tuple:
        out = []
        for path in self.paths:
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        if self.ca:
            ctx.load_verify_locations(cafile=self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def context(self) -> ssl.SSLContext:
        """The current context; the first call raises (OSError, ssl.SSLError) on unusable files."""
        try:
            stamp = self._stamps()
        except OSError as exc:
            if self._context is None:
                raise
            log.warning("stream server TLS files unreadable, keeping the loaded certificate: %s", exc)
            return self._context
        if stamp == self._stamp or stamp == self._failed:
            assert self._context is not None
            return self._context
        try:
            ctx = self._build()
        except (OSError, ssl.SSLError) as exc:
            if self._context is None:
                raise
            self._failed = stamp
            log.warning("stream server TLS files changed but do not load, keeping the loaded certificate: %s", exc)
            return self._context
        if self._context is not None:
            log.info("stream server TLS certificate reloaded from %s", self.cert)
        self._context, self._stamp, self._failed = ctx, stamp, None
        return ctx


# --- one connection -------------------------------------------------------------------------------


class _Live:
    """A connection the server tracks: for stop() and the idle timeout."""

    task: asyncio.Task[None]

    def __init__(self, writer: asyncio.StreamWriter, peer: str, now: float) -> None:
        self.writer = writer
        self.peer = peer
        self.last_activity = now
        self.loop = asyncio.get_running_loop()

    def touch(self) -> None:
        self.last_activity = self.loop.time()

    def abort(self) -> None:
        transport = self.writer.transport
        if transport is not None:
            transport.abort()


class _Reader:
    """The socket's reader; every byte read counts as activity."""

    def __init__(self, reader: asyncio.StreamReader, live: _Live) -> None:
        self._reader = reader
        self._live = live

    async def readexactly(self, n: int) -> bytes:
        data = await self._reader.readexactly(n)
        self._live.touch()
        return data

    async def read(self, n: int = -1) -> bytes:
        data = await self._reader.read(n)
        self._live.touch()
        return data

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        data = await self._reader.readuntil(separator)
        self._live.touch()
        return data

    def at_eof(self) -> bool:
        return self._reader.at_eof()


class _Writer:
    """The socket's writer; every byte written counts as activity."""

    def __init__(self, writer: asyncio.StreamWriter, live: _Live) -> None:
        self._writer = writer
        self._live = live

    def write(self, data: bytes) -> None:
        self._live.touch()
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()
        self._live.touch()

    def close(self) -> None:
        self._writer.close()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    async def wait_closed(self) -> None:
        await self._writer.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._writer.get_extra_info(name, default)

    @property
    def transport(self) -> asyncio.BaseTransport:
        return self._writer.transport


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer)


# --- the server -----------------------------------------------------------------------------------


class StreamServer:
    def __init__(
        self,
        config: StreamServerConfig,
        handler: StreamHandler,
        *,
        session_factory: SessionFactory | None = None,
        head_timeout: float = HEAD_TIMEOUT,
        tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.config = config
        self.handler = handler
        self.base_url = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.cache: RequestCache[StreamRequest] = RequestCache(config.token_ttl, max_in_flight)
        self._session_factory = session_factory or _spdy_session
        self._head_timeout = head_timeout
        self._tls_handshake_timeout = tls_handshake_timeout
        self._max_message_size = max_message_size
        self._tls: _TLSFiles | None = None
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._resume_accept: asyncio.TimerHandle | None = None
        self._setting_up: dict[asyncio.Task[None], socket.socket] = {}
        self._live: set[_Live] = set()
        self._lock = threading.Lock()
        self._active = {kind: 0 for kind in KINDS}

    # --- lifecycle (any thread) ---

    def start(self) -> None:
        """Bind and serve on a new thread. Raises OSError (ssl.SSLError is one) when the address
        cannot be bound or the TLS files cannot be loaded, ValueError for an incomplete TLS setup."""
        if self._thread is not None:
            raise RuntimeError("the stream server is already started")
        cfg = self.config
        if cfg.tls_cert or cfg.tls_key or cfg.tls_ca:
            if not (cfg.tls_cert and cfg.tls_key):
                raise ValueError("stream server TLS needs both a certificate and a key")
            tls = _TLSFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
            tls.context()
            self._tls = tls
        infos = socket.getaddrinfo(cfg.address or None, cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        sock = socket.create_server((cfg.address, cfg.port), family=family, backlog=128)
        sock.setblocking(False)
        host, port = sock.getsockname()[:2]
        shown = cfg.address or host
        if ":" in shown:
            shown = f"[{shown}]"
        self.base_url = f"{'https' if self._tls else 'http'}://{shown}:{port}"

        loop = asyncio.new_event_loop()
        self.loop = loop
        self._listener = sock

        running = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._listen()
            loop.call_soon(running.set)
            try:
                loop.run_forever()
            finally:
                self._finish_loop(loop)

        self._thread = threading.Thread(target=run, name="stream-server", daemon=True)
        self._thread.start()
        running.wait()  # stop() right after start() must find the loop running
        log.info("stream server listening on %s", self.base_url)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every live connection, end their sessions, join the thread."""
        thread, loop = self._thread, self.loop
        if thread is None or loop is None:
            return
        if loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), loop)
            try:
                future.result(timeout + 1.0)
            except Exception as exc:  # a stuck session: the loop's own cleanup cancels it
                log.warning("stream server shutdown: %r", exc)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout + 1.0)
        if thread.is_alive():
            log.warning("stream server thread did not end within %.1fs", timeout)
        self._thread = None

    def url_for(self, request: StreamRequest) -> str:
        """The URL for `request` with a fresh token (thread-safe). Raises TooManyInFlight when full."""
        if request.kind not in KINDS:
            raise ValueError(f"unknown stream kind {request.kind!r}")
        if not self.base_url:
            raise RuntimeError("the stream server is not started")
        return f"{self.base_url}/{request.kind}/{self.cache.insert(request)}"

    def active_sessions(self) -> dict[str, int]:
        """Live sessions by kind (thread-safe)."""
        with self._lock:
            return dict(self._active)

    # --- on the loop ---

    # our own accept rather than asyncio.start_server: in 3.11 a socket accepted right before
    # Server.close() leaks (Server._attach asserts in the transport); here every accepted socket is
    # tracked until it is a connection (_accept) or closed

    def _listen(self) -> None:
        assert self.loop is not None and self._listener is not None
        self.loop.add_reader(self._listener.fileno(), self._on_listener_readable)

    def _on_listener_readable(self) -> None:
        assert self.loop is not None and self._listener is not None
        for _ in range(64):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: pause accepting instead of spinning
                log.warning("stream server accept failed: %s", exc)
                self.loop.remove_reader(self._listener.fileno())
                self._resume_accept = self.loop.call_later(0.5, self._listen)
                return
            conn.setblocking(False)
            # socket.create_server leaves proto 0, so asyncio does not set TCP_NODELAY itself: without
            # it a small SPDY reply waits behind the client's delayed ACK (+40 ms per exec)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self.loop.create_task(self._set_up(conn), name="stream-setup")
            self._setting_up[task] = conn

    async def _set_up(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEAD, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, self._accept, loop=loop)
        try:
            await loop.connect_accepted_socket(lambda: protocol, conn)
        except (OSError, asyncio.CancelledError) as exc:
            log.debug("stream connection lost while being set up: %r", exc)
            conn.close()
        finally:
            self._setting_up.pop(asyncio.current_task(), None)  # type: ignore[arg-type]

    async def _shutdown(self, timeout: float) -> None:
        self._close_listener()
        if self._setting_up:  # sockets accepted just now become connections within a loop turn or two
            await asyncio.wait(set(self._setting_up), timeout=1.0)
        for conn in list(self._setting_up.values()):
            conn.close()
        live = list(self._live)
        for conn in live:  # sockets first: no session waits on a peer (close handshakes) any more
            conn.abort()
            conn.task.cancel()
        if live:
            await asyncio.wait({c.task for c in live}, timeout=timeout)

    def _close_listener(self) -> None:
        if self._resume_accept is not None:
            self._resume_accept.cancel()
        if self._listener is not None and self._listener.fileno() >= 0:
            assert self.loop is not None
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()

    def _finish_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the server thread once the loop stopped: nothing of it may outlive stop()."""
        try:
            for conn in list(self._live):
                conn.abort()
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=2.0))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        except Exception:
            log.exception("stream server loop cleanup failed")
        finally:
            for conn in list(self._setting_up.values()):
                conn.close()
            self._close_listener()
            loop.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # synchronous, so that stop() knows every accepted socket, even one whose task never ran
        loop = asyncio.get_running_loop()
        live = _Live(writer, _peer(writer), loop.time())
        live.task = loop.create_task(self._on_connection(reader, writer, live), name="stream-connection")
        self._live.add(live)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, live: _Live) -> None:
        loop = asyncio.get_running_loop()
        watchdog = loop.create_task(self._watch_idle(live), name="stream-idle")
        try:
            if self._tls is not None:
                try:
                    ctx = self._tls.context()
                    await writer.start_tls(ctx, ssl_handshake_timeout=self._tls_handshake_timeout)
                except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
                    log.warning("stream connection from %s: TLS handshake failed: %s", live.peer, exc)
                    return
            await self._serve(_Reader(reader, live), _Writer(writer, live), live)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("stream connection from %s broke: %r", live.peer, exc)
        except asyncio.CancelledError:
            pass  # stop() or the idle timeout; ending as cancelled would log an error (3.11's callback)
        except Exception:
            log.exception("stream connection from %s failed", live.peer)
        finally:
            watchdog.cancel()
            self._live.discard(live)
            if not writer.is_closing():
                writer.close()  # flushes what is left (an error answer), then closes
            try:
                await asyncio.wait_for(writer.wait_closed(), SHUTDOWN_GRACE)
            except BaseException:  # a peer that does not read, or stop(): drop the socket
                live.abort()

    async def _watch_idle(self, live: _Live) -> None:
        idle = self.config.idle_timeout
        if not idle or idle <= 0:
            return
        loop = asyncio.get_running_loop()
        while True:
            remaining = live.last_activity + idle - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(remaining)
        log.info("stream connection from %s idle for %ss: closing it", live.peer, idle)
        live.abort()
        await asyncio.sleep(SHUTDOWN_GRACE)
        live.task.cancel()  # a session that did not notice its socket is gone

    async def _serve(self, reader: _Reader, writer: _Writer, live: _Live) -> None:
        try:
            req = await read_request_head(reader, timeout=self._head_timeout)  # type: ignore[arg-type]
            if req is None:
                return
            upgraded = await self._route(req, reader, writer, live)
        except HTTPError as err:
            writer.write(error_response(err))
            await writer.drain()
            return
        await upgraded()

    async def _route(self, req: HTTPRequest, reader: _Reader, writer: _Writer, live: _Live) -> Callable[[], Any]:
        """Check the request and answer the upgrade; the coroutine function that runs the session.
        Everything that fails before the upgrade raises HTTPError."""
        parts = req.path.split("/")
        if len(parts) != 3 or parts[0] or parts[1] not in KINDS or not parts[2]:
            raise HTTPError(404, "404 page not found")
        kind, token = parts[1], parts[2]
        if req.method not in ("GET", "POST"):
            raise HTTPError(405, f"method {req.method} not allowed", [("Allow", "GET, POST")])
        request = self.cache.consume(token)
        if request is None or request.kind != kind:
            why = "unknown, used or expired token" if request is None else f"a token for {request.kind}"
            log.warning("stream request from %s for /%s refused: %s", live.peer, kind, why)
            raise HTTPError(404, "404 page not found")

        if kind == "portforward" and is_websocket_request(req) and tunnel_protocols(req):
            protocol = _negotiate(tunnel_protocols(req), PORTFORWARD_SPDY_PROTOCOLS)
            check_handshake(req)
            conn = await accept_websocket(
                reader, writer, req, TUNNEL_PREFIX + protocol, max_message_size=self._max_message_size
            )
            t_reader, t_writer = tunnel_streams(conn)
            return lambda: self._run_spdy(request, t_reader, t_writer, protocol, live, tunnel=conn)

        if is_websocket_request(req):
            check_handshake(req)
            supported = PORTFORWARD_WS_PROTOCOLS if kind == "portforward" else REMOTECOMMAND_WS_PROTOCOLS
            chosen = negotiate_subprotocol(offered_subprotocols(req), supported)
            if chosen is None:
                raise HTTPError(403)  # x/net/websocket: a failed Handshake is a bare 403
            conn = await accept_websocket(reader, writer, req, chosen, max_message_size=self._max_message_size)
            shown = chosen or ("v4.channel.k8s.io" if kind == "portforward" else "channel.k8s.io")
            transport = WebSocketTransport(conn, shown, req.query)
            return lambda: self._run_websocket(request, transport, live)

        supported = PORTFORWARD_SPDY_PROTOCOLS if kind == "portforward" else REMOTECOMMAND_SPDY_PROTOCOLS
        protocol = negotiate_spdy_protocol(req, supported)
        check_spdy_upgrade(req)
        writer.write(spdy_upgrade_response(protocol))
        await writer.drain()
        return lambda: self._run_spdy(request, reader, writer, protocol, live)

    async def _run_spdy(
        self,
        request: StreamRequest,
        reader: Any,
        writer: Any,
        protocol: str,
        live: _Live,
        tunnel: WebSocketConnection | None = None,
    ) -> None:
        session = self._session_factory(reader, writer, server=True, idle_timeout=self.config.idle_timeout)
        runner = asyncio.get_running_loop().create_task(session.run(), name="spdy-session")
        transport = SpdyTransport(session, protocol, tunnelled=tunnel is not None)
        try:
            await self._call_handler(request, transport, live)
        finally:
            try:
                await asyncio.wait_for(session.close(), SHUTDOWN_GRACE)
            except Exception as exc:
                log.debug("closing the SPDY session from %s: %r", live.peer, exc)
            try:
                await asyncio.wait_for(asyncio.shield(runner), SHUTDOWN_GRACE)
            except Exception:
                pass
            if not runner.done():
                runner.cancel()
            try:
                await runner
            except asyncio.CancelledError:
                if not runner.cancelled():
                    raise
            except Exception:
                log.exception("SPDY session from %s failed", live.peer)
            if tunnel is not None:
                await tunnel.close()

    async def _run_websocket(self, request: StreamRequest, transport: WebSocketTransport, live: _Live) -> None:
        ok = False
        try:
            ok = await self._call_handler(request, transport, live)
        finally:
            await transport.conn.close(1000 if ok else CLOSE_INTERNAL_ERROR)

    async def _call_handler(self, request: StreamRequest, transport: Transport, live: _Live) -> bool:
        """Run the handler for one session; False when it raised (logged, never propagated)."""
        kind = request.kind
        with self._lock:
            self._active[kind] += 1
        try:
            if kind == "portforward":
                await self.handler.serve_portforward(request, transport)
            else:
                await self.handler.serve_remotecommand(request, transport)
            return True
        except ConnectionError as exc:
            log.info("stream %s session from %s: connection lost: %s", kind, live.peer, exc)
            return False
        except Exception:
            log.exception("stream %s session from %s failed", kind, live.peer)
            return False
        finally:
            with self._lock:
                self._active[kind] -= 1

