"""Exec, Attach and PortForward: the RPCs check the request and hand out a single-use URL; the
stream server serves the session on its own asyncio loop through the pod's runtime.

The RPC answers at once (a gRPC worker is never held by a session). The session runs later,
when the client connects, as its own span (`stream.exec`, `stream.attach`, `stream.port_forward`)
in the trace of the RPC that issued the URL, with a link to that RPC's span.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from pycrio.config import Config
from pycrio.config.schema import parse_duration
from pycrio.cri import api_pb2
from pycrio.errors import FailedPrecondition, InvalidArgument, NotFound
from pycrio.pods.containers import ContainerManager
from pycrio.pods.runtimes import RuntimeHandlers
from pycrio.state import StateStore
from pycrio.state.records import CONTAINER_RUNNING, SANDBOX_READY
from pycrio.streaming.portforward import serve_portforward
from pycrio.streaming.remotecommand import serve_remotecommand
from pycrio.streaming.server import (
    SpdyTransport,
    StreamRequest,
    StreamServer,
    StreamServerConfig,
    WebSocketTransport,
)
from pycrio.streaming.session import ExecOutcome, SessionCounters, SessionIO
from pycrio.tracing.call import CallInfo, current_call, new_request_id

log = logging.getLogger("pycrio.streaming")

_TRACER = trace.get_tracer("pycrio.streaming")
SPAN_NAMES = {"exec": "stream.exec", "attach": "stream.attach", "portforward": "stream.port_forward"}
KINDS = tuple(SPAN_NAMES)


@dataclass
class StreamStats:
    """Sessions and bytes by kind, for metrics and `pycrio status` (updated on the stream loop)."""

    active: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    sessions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    bytes_in: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    bytes_out: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self.lock:
            return {
                "active": dict(self.active), "sessions": dict(self.sessions),
                "bytes_in": dict(self.bytes_in), "bytes_out": dict(self.bytes_out),
            }  # fmt: skip


def server_config(config: Config) -> StreamServerConfig:
    api = config.api
    return StreamServerConfig(
        address=api.stream_address,
        port=api.stream_port,
        tls_cert=api.stream_tls_cert,
        tls_key=api.stream_tls_key,
        tls_ca=api.stream_tls_ca,
        idle_timeout=parse_duration(api.stream_idle_timeout),
        token_ttl=parse_duration(api.stream_token_ttl),
    )


class StreamManager:
    """Owns the stream server; checks streaming requests and serves their sessions."""

    def __init__(
        self, config: Config, state: StateStore, containers: ContainerManager, handlers: RuntimeHandlers
    ) -> None:
        self.state = state
        self.containers = containers
        self.handlers = handlers
        self.stats = StreamStats()
        self.server = StreamServer(server_config(config), self)

    def start(self) -> None:
        self.server.start()
        log.info("stream server (exec, attach, port-forward) listening on %s", self.server.base_url)

    def stop(self) -> None:
        self.server.stop()

    def describe(self) -> dict[str, Any]:
        return {"url": self.server.base_url, **self.stats.snapshot()}

    # --- the RPCs (gRPC threads) -----------------------------------------------------------

    def exec_url(self, request: api_pb2.ExecRequest) -> str:
        _check_stdio("exec", request.container_id, request.tty, request.stdin, request.stdout, request.stderr)
        if not request.cmd:
            raise InvalidArgument("exec command must not be empty")
        record = self._running_container(request.container_id, "exec in it")
        return self._url(StreamRequest(
            kind="exec", container_id=record.id, pod_id=record.pod_id, cmd=tuple(request.cmd),
            tty=request.tty, stdin=request.stdin, stdout=request.stdout, stderr=request.stderr,
            **_trace_fields(),
        ))  # fmt: skip

    def attach_url(self, request: api_pb2.AttachRequest) -> str:
        _check_stdio("attach", request.container_id, request.tty, request.stdin, request.stdout, request.stderr)
        record = self._running_container(request.container_id, "attach to it")
        config = record.container_config
        if request.tty and not config.tty:
            raise FailedPrecondition(f"container {record.id} has no terminal (created with tty=false): attach without -t")
        if request.stdin and not config.stdin:
            raise FailedPrecondition(f"container {record.id} was created without stdin: attach without -i")
        return self._url(StreamRequest(
            kind="attach", container_id=record.id, pod_id=record.pod_id,
            tty=request.tty, stdin=request.stdin, stdout=request.stdout, stderr=request.stderr,
            **_trace_fields(),
        ))  # fmt: skip

    def port_forward_url(self, request: api_pb2.PortForwardRequest) -> str:
        if not request.pod_sandbox_id:
            raise InvalidArgument("missing required pod_sandbox_id")
        bad = [p for p in request.port if not 0 < p < 65536]
        if bad:
            raise InvalidArgument(f"ports must be between 1 and 65535, got {', '.join(map(str, bad))}")
        pod = self.state.get_pod(request.pod_sandbox_id)
        if pod.state != SANDBOX_READY:
            raise FailedPrecondition(f"pod sandbox {pod.id} is not ready: cannot forward ports into it")
        return self._url(StreamRequest(
            kind="portforward", pod_id=pod.id, ports=tuple(request.port), **_trace_fields(),
        ))  # fmt: skip

    def _running_container(self, container_id: str, what: str) -> Any:
        record = self.containers.refresh(self.state.get_container(container_id))
        if record.state != CONTAINER_RUNNING:
            raise FailedPrecondition(f"container {record.id} is {record.state}, not running: cannot {what}")
        return record

    def _url(self, request: StreamRequest) -> str:
        url = self.server.url_for(request)
        log.debug("%s URL issued for %s", request.kind, request.container_id or request.pod_id)
        return url

    # --- the sessions (the stream server's loop) ------------------------------------------

    async def serve_remotecommand(self, request: StreamRequest, transport: SpdyTransport | WebSocketTransport) -> None:
        with self._session(request, transport) as (span, counters):

            async def run(io: SessionIO) -> ExecOutcome:
                # checked again: the container may have exited since the URL was issued
                record = self.state.get_container(request.container_id)
                if record.state != CONTAINER_RUNNING:
                    raise FailedPrecondition(f"container {record.id} is {record.state}, not running")
                runtime = self.containers.runtime(record)
                handle = self.containers.handle(record)
                io.counters = counters
                if request.kind == "exec":
                    return ExecOutcome(exit_code=await runtime.exec_stream(handle, list(request.cmd), io))
                await runtime.attach_stream(handle, io)
                return ExecOutcome(exit_code=0)

            outcome = await serve_remotecommand(request, transport, run)
            if outcome.exit_code is not None:
                span.set_attribute("exit_code", outcome.exit_code)
            if outcome.error:
                span.set_status(Status(StatusCode.ERROR, outcome.error))
                log.info("%s session in container %s ended: %s", request.kind, request.container_id, outcome.error)
            else:
                log.info(
                    "%s session in container %s ended, exit code %s", request.kind, request.container_id, outcome.exit_code
                )

    async def serve_portforward(self, request: StreamRequest, transport: SpdyTransport | WebSocketTransport) -> None:
        with self._session(request, transport) as (_, counters):
            pod = self.state.get_pod(request.pod_id)
            netns = pod.namespaces.get("net") or None  # none: the pod uses the host's network
            runtime = self.handlers.for_pod(pod.runtime_handler, pod.id)

            async def dial(port: int) -> Any:
                return await runtime.dial_port(netns, port)

            await serve_portforward(request, transport, dial, counters)
            log.info("port-forward session into pod %s ended", pod.id)

    def _session(self, request: StreamRequest, transport: SpdyTransport | WebSocketTransport) -> "_Session":
        return _Session(self, request, transport)


class _Session:
    """One session's span, log context and counters; errors become the span's status."""

    def __init__(self, manager: StreamManager, request: StreamRequest, transport: Any) -> None:
        self.manager, self.request, self.transport = manager, request, transport
        self.counters = SessionCounters()
        self.started = 0.0

    def __enter__(self) -> tuple[trace.Span, SessionCounters]:
        request = self.request
        parent = propagate.extract(dict(request.trace_carrier)) if request.trace_carrier else None
        protocol = "spdy" if isinstance(self.transport, SpdyTransport) else "websocket"
        attributes: dict[str, Any] = {
            "stream.protocol": protocol,
            "stream.subprotocol": self.transport.protocol,
            "pod.id": request.pod_id,
            "uuid": new_request_id(),
        }
        if isinstance(self.transport, SpdyTransport) and self.transport.tunnelled:
            attributes["stream.protocol"] = "spdy-over-websocket"
        if request.container_id:
            attributes["container.id"] = request.container_id
        if request.kind == "exec":
            attributes["command"] = " ".join(request.cmd)
            attributes["tty"] = request.tty
        if request.ports:
            attributes["ports"] = list(request.ports)
        self._span_cm = _TRACER.start_as_current_span(
            SPAN_NAMES[request.kind], context=parent, kind=SpanKind.SERVER, attributes=attributes,
            links=[Link(c) for c in request.links], record_exception=False, set_status_on_exception=False,
        )  # fmt: skip
        self.span = self._span_cm.__enter__()
        self._call_token = current_call.set(CallInfo(request_id=attributes["uuid"], method=SPAN_NAMES[request.kind]))
        stats = self.manager.stats
        with stats.lock:
            stats.active[request.kind] += 1
            stats.sessions[request.kind] += 1
        self.started = time.monotonic()
        return self.span, self.counters

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> bool:
        request, span, counters = self.request, self.span, self.counters
        stats = self.manager.stats
        with stats.lock:
            stats.active[request.kind] -= 1
            stats.bytes_in[request.kind] += counters.bytes_in
            stats.bytes_out[request.kind] += counters.bytes_out
        span.set_attribute("bytes_in", counters.bytes_in)
        span.set_attribute("bytes_out", counters.bytes_out)
        span.set_attribute("duration_ms", round((time.monotonic() - self.started) * 1000, 3))
        if error is not None and not isinstance(error, GeneratorExit):
            span.set_status(Status(StatusCode.ERROR, str(error)))
            if isinstance(error, (NotFound, FailedPrecondition)):
                log.warning("%s session refused: %s", request.kind, error)
            else:
                log.warning("%s session failed: %s", request.kind, error, exc_info=error)
        current_call.reset(self._call_token)
        self._span_cm.__exit__(None, None, None)
        return isinstance(error, Exception)  # logged here; the server just closes the connection


def _check_stdio(kind: str, container_id: str, tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    """The stream server's own request checks (as k8s' cri-streaming does them)."""
    if not container_id:
        raise InvalidArgument("missing required container_id")
    if tty and stderr:
        raise InvalidArgument("tty and stderr cannot both be true")  # a terminal has one output stream
    if not (stdin or stdout or stderr):
        raise InvalidArgument(f"{kind}: one of stdin, stdout, or stderr must be set")


def _trace_fields() -> dict[str, Any]:
    """The RPC span (current on this gRPC thread): its context for the session's parent and link."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {"links": (span_context,), "trace_carrier": carrier}
