"""One handler per monitor operation over the ContainerSupervisor; errors become a Response here, once.

Every request runs inside its SERVER span (telemetry.Telemetry.request, named as the daemon's
contract lists: create_container, exec_sync_container...). A CRIError becomes its gRPC code and
message, a ValueError INVALID_ARGUMENT, anything else INTERNAL with the exception's text (logged
with its traceback): a handler's failure never reaches the server loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import AsyncIterator, Awaitable, Callable, Protocol

from google.protobuf import unknown_fields

from pycrio import __version__
from pycrio.errors import CRIError, InvalidArgument, code_name
from pycrio.monitor import monitor_pb2 as pb
from pycrio.monitor.telemetry import RequestSpan, Telemetry, TracingSettings
from pycrio.streaming.session import ClientGone, SessionIO

log = logging.getLogger("pycrio.monitor")

# gRPC status code numbers (grpc.StatusCode.X.value[0]), by name: gRPC itself is not loaded here.
STATUS_NUMBERS = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "ABORTED": 10,
    "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
OK = STATUS_NUMBERS["OK"]
INVALID_ARGUMENT = STATUS_NUMBERS["INVALID_ARGUMENT"]
UNIMPLEMENTED = STATUS_NUMBERS["UNIMPLEMENTED"]
INTERNAL = STATUS_NUMBERS["INTERNAL"]

# Request.op field -> the SERVER span's name (the names the daemon's contract lists).
SPAN_NAMES = {
    "version": "version",
    "create_container": "create_container",
    "start_container": "start_container",
    "exec_sync": "exec_sync_container",
    "kill_container": "kill_container",
    "container_state": "container_state",
    "watch_exits": "watch_exits",
    "reopen_log": "reopen_log_container",
    "set_window_size": "set_window_size_container",
    "serve_exec": "exec_container",
    "serve_attach": "attach_container",
    "delete_container": "delete_container",
    "configure_tracing": "configure_tracing",
    "shutdown": "shutdown",
}
STREAM_OPS = frozenset(("watch_exits", "serve_exec", "serve_attach"))


class Supervisor(Protocol):
    """What rpc.py needs of pycrio.monitor.containers.ContainerSupervisor (MONITOR_API.md)."""

    async def restore(self) -> None: ...
    async def create(self, req: pb.CreateContainerRequest) -> int: ...
    async def start(self, container_id: str) -> None: ...
    async def kill(self, container_id: str, signal: int) -> None: ...
    async def delete(self, container_id: str) -> None: ...
    def state(self, container_id: str) -> pb.ContainerState: ...
    async def exec_sync(self, req: pb.ExecSyncRequest) -> pb.ExecSyncResponse: ...
    async def reopen_log(self, container_id: str) -> None: ...
    async def set_window_size(self, container_id: str, width: int, height: int) -> None: ...
    async def exec_stream(self, req: pb.ServeExecRequest, io: SessionIO) -> int: ...
    async def attach_stream(self, req: pb.ServeAttachRequest, io: SessionIO) -> None: ...
    def watch_exits(self) -> AsyncIterator[pb.ContainerState]: ...
    async def shutdown(self) -> None: ...


class Stream(Protocol):
    """A connection turned into a StreamFrame stream (server.Connection)."""

    async def respond(self, response: pb.Response) -> None: ...
    async def send(self, frame: pb.StreamFrame) -> None: ...
    def session_io(self, tty: bool, stdin: bool, stdout: bool, stderr: bool) -> SessionIO: ...
    async def wait_closed(self) -> None: ...


def error_response(code: int, message: str) -> pb.Response:
    return pb.Response(code=code, error=message)


def _container_id(body: object) -> str:
    return str(getattr(body, "container_id", ""))


def _require_container_id(container_id: str) -> None:
    if not container_id:
        raise InvalidArgument("container_id is empty")


def _status(name: str, exc: BaseException, span: RequestSpan) -> tuple[int, str]:
    """The code number and message `exc` is answered with (the one conversion, as
    pycrio.errors.grpc_status does for the daemon's CRI calls)."""
    if isinstance(exc, CRIError):
        code, message, internal = code_name(exc), exc.message, False
    elif isinstance(exc, ValueError):  # a malformed value deep down: still the request's fault
        code, message, internal = "INVALID_ARGUMENT", str(exc) or type(exc).__name__, False
    else:
        code, message, internal = "INTERNAL", f"{type(exc).__name__}: {exc}", True
    if internal:
        log.error("%s failed: %s", name, message, exc_info=exc)
    else:
        log.debug("%s failed: %s: %s", name, code, message)
    span.fail(code, message)
    return STATUS_NUMBERS.get(code, STATUS_NUMBERS["UNKNOWN"]), message


class MonitorRPC:
    """The operations of one monitor: unary ones through `call`, stream ones through `stream`."""

    def __init__(self, pod_id: str, supervisor: Supervisor, telemetry: Telemetry) -> None:
        self.pod_id = pod_id
        self.supervisor = supervisor
        self.telemetry = telemetry
        self._unary: dict[str, Callable[[pb.Request], Awaitable[pb.Response]]] = {
            "version": self.version,
            "create_container": self.create_container,
            "start_container": self.start_container,
            "exec_sync": self.exec_sync,
            "kill_container": self.kill_container,
            "container_state": self.container_state,
            "reopen_log": self.reopen_log,
            "set_window_size": self.set_window_size,
            "delete_container": self.delete_container,
            "configure_tracing": self.configure_tracing,
            "shutdown": self.shutdown,
        }

    # -- dispatch ----------------------------------------------------------------------------

    @staticmethod
    def operation(request: pb.Request) -> str | None:
        return request.WhichOneof("op")

    @staticmethod
    def unknown_operation(request: pb.Request) -> pb.Response:
        """The answer to a request without a known operation: empty, or one newer than this monitor."""
        numbers = sorted({field.field_number for field in unknown_fields.UnknownFieldSet(request)})
        if numbers:
            return error_response(
                UNIMPLEMENTED, f"operation field {numbers[0]} is not known to pycrio-monitor {__version__}"
            )
        return error_response(INVALID_ARGUMENT, "request carries no operation")

    async def call(self, request: pb.Request) -> pb.Response:
        """Answer one unary request (never raises but for cancellation)."""
        op = self.operation(request)
        handler = self._unary.get(op or "")
        if op is None or handler is None:
            return self.unknown_operation(request)
        name = SPAN_NAMES[op]
        body = getattr(request, op)
        with self.telemetry.request(name, request.uuid, request.trace, _container_id(body)) as span:
            try:
                log.debug("%s request", name)
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a Response
                return error_response(*_status(name, exc, span))

    async def stream(self, request: pb.Request, stream: Stream) -> None:
        """Serve one stream request: the Response, then its StreamFrames until it ends."""
        op = self.operation(request)
        if op == "watch_exits":
            await self._watch_exits(request, stream)
        elif op == "serve_exec":
            await self._serve_session(request, request.serve_exec, stream, exec_=True)
        elif op == "serve_attach":
            await self._serve_session(request, request.serve_attach, stream, exec_=False)
        else:  # pragma: no cover - the server only passes STREAM_OPS here
            await stream.respond(error_response(INTERNAL, f"{op} is not a stream operation"))

    # -- unary operations --------------------------------------------------------------------

    async def version(self, request: pb.Request) -> pb.Response:
        return pb.Response(version=pb.VersionResponse(version=__version__, pid=os.getpid(), pod_id=self.pod_id))

    async def create_container(self, request: pb.Request) -> pb.Response:
        req = request.create_container
        _require_container_id(req.container_id)
        if not req.bundle:
            raise InvalidArgument(f"container {req.container_id}: bundle is empty")
        pid = await self.supervisor.create(req)
        log.info("container %s created, init pid %d", req.container_id, pid)
        return pb.Response(create_container=pb.CreateContainerResponse(pid=pid))

    async def start_container(self, request: pb.Request) -> pb.Response:
        container_id = request.start_container.container_id
        _require_container_id(container_id)
        await self.supervisor.start(container_id)
        log.info("container %s started", container_id)
        return pb.Response(start_container=self.supervisor.state(container_id))

    async def exec_sync(self, request: pb.Request) -> pb.Response:
        req = request.exec_sync
        _require_container_id(req.container_id)
        if not req.cmd:
            raise InvalidArgument(f"exec in container {req.container_id}: the command is empty")
        if req.timeout < 0:
            raise InvalidArgument(f"exec in container {req.container_id}: negative timeout {req.timeout}")
        result = await self.supervisor.exec_sync(req)
        return pb.Response(exec_sync=result)

    async def kill_container(self, request: pb.Request) -> pb.Response:
        req = request.kill_container
        _require_container_id(req.container_id)
        if not 0 < req.signal < 65:
            raise InvalidArgument(f"kill container {req.container_id}: signal {req.signal} is out of range")
        await self.supervisor.kill(req.container_id, req.signal)
        return pb.Response(kill_container=pb.Empty())

    async def container_state(self, request: pb.Request) -> pb.Response:
        container_id = request.container_state.container_id
        _require_container_id(container_id)
        return pb.Response(container_state=self.supervisor.state(container_id))

    async def reopen_log(self, request: pb.Request) -> pb.Response:
        container_id = request.reopen_log.container_id
        _require_container_id(container_id)
        await self.supervisor.reopen_log(container_id)
        return pb.Response(reopen_log=pb.Empty())

    async def set_window_size(self, request: pb.Request) -> pb.Response:
        req = request.set_window_size
        _require_container_id(req.container_id)
        await self.supervisor.set_window_size(req.container_id, req.width, req.height)
        return pb.Response(set_window_size=pb.Empty())

    async def delete_container(self, request: pb.Request) -> pb.Response:
        container_id = request.delete_container.container_id
        _require_container_id(container_id)
        await self.supervisor.delete(container_id)
        log.info("container %s deleted", container_id)
        return pb.Response(delete_container=pb.Empty())

    async def configure_tracing(self, request: pb.Request) -> pb.Response:
        wanted = request.configure_tracing.tracing
        settings = TracingSettings(
            wanted.enabled, wanted.endpoint or TracingSettings().endpoint, wanted.sampling_rate_per_million,
            wanted.relay_socket,
        )
        self.telemetry.configure(settings)
        log.info(
            "tracing %s",
            f"to {f'the daemon relay {settings.relay}' if settings.relay else settings.endpoint}, "
            f"{settings.sampling_rate_per_million} per million" if settings.enabled else "off",
        )
        return pb.Response(configure_tracing=pb.Empty())

    async def shutdown(self, request: pb.Request) -> pb.Response:
        # The server stops once this answer is written (server.Connection).
        log.info("shutdown requested")
        return pb.Response(shutdown=pb.Empty())

    # -- stream operations -------------------------------------------------------------------

    async def _watch_exits(self, request: pb.Request, stream: Stream) -> None:
        """The span covers opening the stream; the stream itself lasts as long as the watcher."""
        with self.telemetry.request("watch_exits", request.uuid, request.trace) as span:
            try:
                exits = self.supervisor.watch_exits()
            except Exception as exc:  # noqa: BLE001
                await stream.respond(error_response(*_status("watch_exits", exc, span)))
                return
            await stream.respond(pb.Response(watch_exits=pb.Empty()))
            log.debug("exit watcher connected")

        async def forward() -> None:
            async for state in exits:
                await stream.send(pb.StreamFrame(exit=state))

        pump = asyncio.ensure_future(forward())
        closed = asyncio.ensure_future(stream.wait_closed())
        try:
            await asyncio.wait({pump, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not pump.done():
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
        aclose = getattr(exits, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        if not pump.cancelled() and pump.exception() is not None:
            exc = pump.exception()
            if not isinstance(exc, ConnectionError):
                log.error("exit watcher failed: %s", exc, exc_info=exc)
                with contextlib.suppress(ConnectionError):
                    await stream.send(pb.StreamFrame(error=f"watching exits failed: {exc}"))
        else:
            log.debug("exit watcher gone")

    async def _serve_session(
        self, request: pb.Request, body: pb.ServeExecRequest | pb.ServeAttachRequest, stream: Stream, exec_: bool
    ) -> None:
        """exec or attach: Response, then stdin/resize in, stdout/stderr out, and the final frame."""
        name = "exec_container" if exec_ else "attach_container"
        with self.telemetry.request(name, request.uuid, request.trace, body.container_id) as span:
            try:
                _require_container_id(body.container_id)
                if isinstance(body, pb.ServeExecRequest) and not body.cmd:
                    raise InvalidArgument(f"exec in container {body.container_id}: the command is empty")
                self.supervisor.state(body.container_id)  # unknown container: an error Response, no stream
            except Exception as exc:  # noqa: BLE001
                await stream.respond(error_response(*_status(name, exc, span)))
                return
            await stream.respond(pb.Response(serve_exec=pb.Empty()) if exec_ else pb.Response(serve_attach=pb.Empty()))
            io = stream.session_io(body.tty, body.stdin, body.stdout, body.stderr)
            try:
                if isinstance(body, pb.ServeExecRequest):
                    code = await self.supervisor.exec_stream(body, io)
                    span.set_attribute("exit_code", code)
                    log.debug("exec in container %s exited with %d", body.container_id, code)
                else:
                    await self.supervisor.attach_stream(body, io)
                    code = 0
                await stream.send(pb.StreamFrame(exit_code=code))
            except (ClientGone, ConnectionError):
                log.debug("%s: the client went away", name)
            except Exception as exc:  # noqa: BLE001 - the session's failure is its last frame
                _, message = _status(name, exc, span)
                with contextlib.suppress(ConnectionError):
                    await stream.send(pb.StreamFrame(error=message))
