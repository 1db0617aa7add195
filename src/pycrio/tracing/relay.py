"""Monitors' spans exported by the daemon: both ends of a unix datagram socket in the runroot.

A tracing pycrio-monitor used to hold an OTLP/gRPC channel of its own: six gRPC threads and
their buffers, 1.1-1.4 MiB of PSS per pod and a few ms of CPU per monitor (bench/monitor_memory.py,
its "pod-direct" handler). Now a monitor told the daemon's relay socket (`--tracing-relay`, or
ConfigureTracing) encodes each batch with `SpanEncoder` (the OTLP bytes the SDK would send) and
sends it as one datagram; the daemon's `SpanRelay` queues it in its own `SpanBatcher`, whose next
export appends it to the daemon's request. Protobuf concatenation appends repeated fields, so a
monitor's ResourceSpans (its own service.name, pod.id, process.pid) reach the collector exactly as
the monitor encoded them, in the daemon's export and under its configuration: a SIGHUP that moves
the endpoint moves the monitors' spans too.

Datagram: `PCS1`, the span count (uint32, big endian), then ExportTraceServiceRequest bytes.
A monitor whose datagram cannot be delivered (daemon stopped, restarting) counts the batch as
failed in its own export health, as an unreachable collector was counted before.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from pycrio.tracing.otlp_encode import SpanEncoder, Unsupported, sdk_encode

if TYPE_CHECKING:
    from pycrio.tracing.exporter import ExportHealth

log = logging.getLogger("pycrio.tracing")

RELAY_SOCKET_NAME = "monitor-spans.sock"  # in the daemon's runroot
# "off": the daemon binds no relay and its monitors export over OTLP/gRPC themselves, as before
# (bench/monitor_memory.py compares the two; an escape hatch)
RELAY_ENV = "PYCRIO_TRACING_RELAY"
MAGIC = b"PCS1"
_HEADER = struct.Struct(">4sI")
# A unix datagram must fit the sender's send buffer (net.core.wmem_default, 208 KiB here): a
# batch that encodes larger is sent in halves.
MAX_PAYLOAD = 160 * 1024
MAX_DATAGRAM = _HEADER.size + MAX_PAYLOAD
MAX_SPANS_PER_DATAGRAM = 1 << 20
SEND_TIMEOUT = 1.0  # s a monitor's export thread waits for room in the daemon's queue
RELAY_THREAD = "pycrio-relay"


class BadDatagram(ValueError):
    """A datagram that is not a relayed span batch."""


def pack(spans: int, payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, spans) + payload


def unpack(datagram: bytes) -> tuple[int, bytes]:
    """(span count, ExportTraceServiceRequest bytes); raises BadDatagram."""
    if len(datagram) < _HEADER.size:
        raise BadDatagram(f"{len(datagram)} bytes, shorter than the header")
    magic, spans = _HEADER.unpack_from(datagram)
    if magic != MAGIC:
        raise BadDatagram(f"magic {magic!r}, not {MAGIC!r}")
    if not 0 < spans <= MAX_SPANS_PER_DATAGRAM:
        raise BadDatagram(f"span count {spans}")
    if len(datagram) > MAX_DATAGRAM:
        raise BadDatagram(f"longer than {MAX_DATAGRAM} bytes")
    payload = datagram[_HEADER.size :]
    check_request(payload)
    return spans, payload


def check_request(payload: bytes) -> None:
    """Raise BadDatagram unless `payload` is a sequence of ExportTraceServiceRequest.resource_spans
    fields (tag 1, length-delimited) that ends exactly at its end: what concatenation onto the
    daemon's own request needs so that a bad datagram can never spoil the daemon's spans."""
    if not payload:
        raise BadDatagram("no payload")
    view = memoryview(payload)
    at, end = 0, len(payload)
    while at < end:
        if view[at] != 0x0A:
            raise BadDatagram(f"field tag {view[at]:#x} at {at}, not resource_spans")
        at += 1
        length = shift = 0
        while True:
            if at >= end or shift > 28:
                raise BadDatagram("truncated length")
            byte = view[at]
            at += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        at += length
    if at != end:
        raise BadDatagram("a field runs past the end")


class RelaySpanExporter(SpanExporter):
    """The monitor's exporter: each batch, encoded, as datagrams to the daemon's relay socket."""

    def __init__(self, path: str | os.PathLike[str], health: ExportHealth | None = None) -> None:
        self.path = os.fspath(path)
        self._health = health
        self._encoder = SpanEncoder()
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        if not spans:
            return SpanExportResult.SUCCESS
        try:
            parts = self._encode(spans, self._encoder.encode_request)
        except Unsupported:
            parts = self._encode(spans, sdk_encode)
        datagrams = [pack(len(part), payload) for part, payload in parts]
        problem = ""
        with self._lock:
            for datagram in datagrams:
                if len(datagram) > MAX_DATAGRAM:  # one span alone: dropped, the rest still sent
                    problem = f"a span encodes to {len(datagram)} bytes, over the relay's {MAX_DATAGRAM}"
                    continue
                problem = self._send(datagram) or problem
                if problem and self._socket is None:
                    break  # the relay is unreachable: the rest would fail alike
        if problem:
            if self._health is not None:
                self._health.note_error(f"relay {self.path}: {problem}")
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _encode(
        self, spans: Sequence[ReadableSpan], encode: Callable[[Sequence[ReadableSpan]], bytes]
    ) -> list[tuple[Sequence[ReadableSpan], bytes]]:
        """(spans, request bytes) parts of at most MAX_PAYLOAD bytes each (a lone span may be more)."""
        payload = encode(spans)
        if len(payload) <= MAX_PAYLOAD or len(spans) == 1:
            return [(spans, payload)]
        half = len(spans) // 2
        return self._encode(spans[:half], encode) + self._encode(spans[half:], encode)

    def _send(self, datagram: bytes) -> str:
        """'' once sent, else why not (the daemon's relay is down or its queue stayed full)."""
        for attempt in (1, 2):
            try:
                if self._socket is None:
                    self._socket = self._connect()
                self._socket.send(datagram)
                return ""
            except (ConnectionRefusedError, FileNotFoundError, BrokenPipeError, ConnectionResetError) as exc:
                # the daemon restarted (a new socket at the same path) or is not running
                self._disconnect()
                if attempt == 2:
                    return exc.strerror or str(exc)
            except TimeoutError:
                return f"its queue stayed full for {SEND_TIMEOUT:.0f}s"
            except OSError as exc:
                self._disconnect()
                if exc.errno == errno.EMSGSIZE:
                    return f"a datagram of {len(datagram)} bytes is too large for the socket"
                return exc.strerror or str(exc)
        return "unreachable"

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.settimeout(SEND_TIMEOUT)  # a connected datagram socket waits for room in the peer's queue
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def _disconnect(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            self._disconnect()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class SpanRelay:
    """The daemon's end: receives monitors' batches on `path` and hands each to `deliver(spans,
    payload)` (Tracing.relay: the current pipeline's queue, or counted as dropped)."""

    def __init__(self, path: Path, deliver: Callable[[int, bytes], None]) -> None:
        self.path = Path(path)
        self._deliver = deliver
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self.received = 0
        self.rejected = 0

    def start(self) -> None:
        """Bind the socket (replacing a stale one of an earlier run) and start the receiving thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
        except BaseException:
            sock.close()
            raise
        self._socket = sock
        self._thread = threading.Thread(target=self._run, args=(sock,), name=RELAY_THREAD, daemon=True)
        self._thread.start()

    def _run(self, sock: socket.socket) -> None:
        while True:
            try:
                datagram = sock.recv(MAX_DATAGRAM + 1)  # one byte more: a longer one shows as too long
            except OSError:
                if self._closing:
                    return
                continue
            if not datagram and self._closing:
                return  # close()'s wake-up: what monitors sent before it has been handled
            self.handle(datagram)

    def handle(self, datagram: bytes) -> None:
        """One datagram: delivered, or rejected with a warning (the first and every 100th)."""
        try:
            spans, payload = unpack(datagram)
        except BadDatagram as exc:
            self.rejected += 1
            if self.rejected % 100 == 1:
                log.warning("span relay %s: ignored a datagram that is no span batch (%d so far): %s",
                            self.path, self.rejected, exc)
            return
        self.received += spans
        try:
            self._deliver(spans, payload)
        except Exception:  # noqa: BLE001 - the relay thread must live on
            log.exception("span relay %s: delivering %d spans failed", self.path, spans)

    def close(self) -> None:
        """Stop receiving and remove the socket."""
        sock, self._socket = self._socket, None
        if sock is None:
            return
        self._closing = True
        waker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            waker.sendto(b"", str(self.path))  # wakes the blocked recv
        except OSError:
            pass
        finally:
            waker.close()
        if self._thread is not None:
            self._thread.join(2.0)
        sock.close()
        self.path.unlink(missing_ok=True)
