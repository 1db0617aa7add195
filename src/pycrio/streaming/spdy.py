"""SPDY/3.1 as Kubernetes streaming speaks it: a sans-IO frame layer and an asyncio session.

The peer on the other end is in practice github.com/moby/spdystream (client-go's remotecommand and
port-forward, i.e. crictl, kubectl, kubelet's proxy; also inside the WebSocket tunnel of
`port-forward --transport websocket`). Facts about it that shape this module:

- Header blocks are zlib streams with the SPDY/3 dictionary, ONE context per direction for the whole
  session, each block ended by a sync flush. A peer that gets a block it cannot inflate stops reading.
- spdystream implements no flow control: it never sends SETTINGS or WINDOW_UPDATE, ignores ours (they
  reach its "unhandled frame type" branch) and sends DATA regardless of any window, one frame per
  Write call. So: we always send WINDOW_UPDATE as the application consumes (harmless to it, needed by
  a SPDY/3.1 peer), but we wait on the send window only once the peer has shown it does flow control
  (a WINDOW_UPDATE, or SETTINGS with INITIAL_WINDOW_SIZE); otherwise our writes would stop for good
  after 64 KiB. On the receiving side a peer that overruns the window we granted is not an error
  (spdystream always would); the frame loop stops reading the socket until the application has read
  the stream below its window, so a stream's unread data stays bounded and TCP pushes back.
- spdystream drops DATA for a stream it opened until our SYN_REPLY arrived, and its CreateStream waits
  for that reply: the frame loop replies to each SYN_STREAM as soon as it reads it.
- On GOAWAY spdystream stops reading at once, then closes when its streams are done: our close()
  writes everything pending, then GOAWAY, then closes.

The application must keep reading every stream it accepted (or reset it): a stream whose window is
full holds the frame loop, as spdystream's own workers do.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence, Union

log = logging.getLogger("pycrio.streaming.spdy")

VERSION = 3

# control frame types
SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

# flags
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02  # SYN_STREAM only
FLAG_SETTINGS_CLEAR_SETTINGS = 0x01  # SETTINGS frame flag
FLAG_SETTINGS_PERSIST_VALUE = 0x01  # per-setting flags
FLAG_SETTINGS_PERSISTED = 0x02

# RST_STREAM status codes
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
UNSUPPORTED_VERSION = 4
CANCEL = 5
INTERNAL_ERROR = 6
FLOW_CONTROL_ERROR = 7
STREAM_IN_USE = 8
STREAM_ALREADY_CLOSED = 9
FRAME_TOO_LARGE = 11

# GOAWAY status codes
GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_INTERNAL_ERROR = 2

# SETTINGS ids
SETTINGS_UPLOAD_BANDWIDTH = 1
SETTINGS_DOWNLOAD_BANDWIDTH = 2
SETTINGS_ROUND_TRIP_TIME = 3
SETTINGS_MAX_CONCURRENT_STREAMS = 4
SETTINGS_CURRENT_CWND = 5
SETTINGS_DOWNLOAD_RETRANS_RATE = 6
SETTINGS_INITIAL_WINDOW_SIZE = 7
SETTINGS_CLIENT_CERTIFICATE_VECTOR_SIZE = 8

DEFAULT_WINDOW = 64 * 1024  # SPDY/3.1: initial stream and session windows
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
MAX_FRAME_PAYLOAD = 2**24 - 1  # the 24-bit length field
MAX_CONTROL_PAYLOAD = 1 << 20  # k8s headers are a few hundred bytes
MAX_HEADER_BLOCK = 1 << 20  # inflated header block
MAX_HEADER_COUNT = 1000
DATA_CHUNK = 64 * 1024  # what one write() puts in a DATA frame at most
MAX_UNFLUSHED = 256 * 1024  # the frame loop waits for the writer past this

# The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00 2.6.10.1): 65
# length-prefixed words, then a run of common values. Its adler32 (the zlib dict id) is 0xe3c6a7c2.
_DICT_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding accept-language "
    "accept-ranges age allow authorization cache-control connection content-base content-encoding "
    "content-language content-length content-location content-md5 content-range content-type date "
    "etag expect expires from host if-match if-modified-since if-none-match if-range "
    "if-unmodified-since last-modified location max-forwards pragma proxy-authenticate "
    "proxy-authorization range referer retry-after server te trailer transfer-encoding upgrade "
    "user-agent vary via warning www-authenticate method get status"
).split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
_DICT_TAIL = (
    b"100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    b"203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    b"401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    b"503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    b"Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    b"application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    b"gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
HEADER_DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _DICT_WORDS) + _DICT_TAIL

Headers = dict[str, list[str]]
HeadersIn = Mapping[str, Union[str, Sequence[str]]]


class SpdyError(Exception):
    """A session error: the peer broke the protocol; the session ends with GOAWAY(status)."""

    def __init__(self, message: str, status: int = GOAWAY_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.status = status


class StreamReset(ConnectionResetError):
    """The stream was reset (RST_STREAM either way) or its session ended."""

    def __init__(self, stream_id: int, status: int, message: str = "") -> None:
        super().__init__(message or f"SPDY stream {stream_id} reset (status {status})")
        self.stream_id = stream_id
        self.status = status


# ---------------------------------------------------------------------------------------------
# frames


@dataclass
class DataFrame:
    stream_id: int
    data: bytes = b""
    flags: int = 0

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


@dataclass
class SynStreamFrame:
    stream_id: int
    headers: Headers = field(default_factory=dict)
    flags: int = 0
    associated_stream_id: int = 0
    priority: int = 0  # 3 bits, 0 is the highest
    slot: int = 0


@dataclass
class SynReplyFrame:
    stream_id: int
    headers: Headers = field(default_factory=dict)
    flags: int = 0


@dataclass
class RstStreamFrame:
    stream_id: int
    status: int


@dataclass
class Setting:
    id: int
    value: int
    flags: int = 0


@dataclass
class SettingsFrame:
    settings: list[Setting] = field(default_factory=list)
    flags: int = 0

    def get(self, setting_id: int) -> int | None:
        for s in self.settings:
            if s.id == setting_id:
                return s.value
        return None


@dataclass
class PingFrame:
    ping_id: int


@dataclass
class GoAwayFrame:
    last_good_stream_id: int
    status: int = GOAWAY_OK


@dataclass
class HeadersFrame:
    stream_id: int
    headers: Headers = field(default_factory=dict)
    flags: int = 0


@dataclass
class WindowUpdateFrame:
    stream_id: int  # 0: the session window
    delta: int


Frame = Union[
    DataFrame, SynStreamFrame, SynReplyFrame, RstStreamFrame, SettingsFrame, PingFrame, GoAwayFrame,
    HeadersFrame, WindowUpdateFrame,
]


def normalize_headers(headers: HeadersIn) -> Headers:
    """Names lower-cased (SPDY requires it), each value a list."""
    out: Headers = {}
    for name, value in headers.items():
        values = [value] if isinstance(value, str) else list(value)
        out.setdefault(name.lower(), []).extend(values)
    return out


def encode_header_block(headers: HeadersIn) -> bytes:
    """The uncompressed name/value block: count, then length-prefixed names and NUL-joined values."""
    norm = normalize_headers(headers)
    parts = [struct.pack(">I", len(norm))]
    for name, values in norm.items():
        if not name:
            raise ValueError("empty header name")
        n = name.encode()
        v = "\x00".join(values).encode()
        parts += [struct.pack(">I", len(n)), n, struct.pack(">I", len(v)), v]
    return b"".join(parts)


def decode_header_block(raw: bytes) -> Headers:
    """Parses one inflated name/value block; raises SpdyError when it is malformed."""
    view = memoryview(raw)
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(view):
            raise SpdyError("truncated header block")
        chunk = bytes(view[pos:pos + n])
        pos += n
        return chunk

    (count,) = struct.unpack(">I", take(4))
    if count > MAX_HEADER_COUNT:
        raise SpdyError(f"header block has {count} headers (limit {MAX_HEADER_COUNT})")
    headers: Headers = {}
    for _ in range(count):
        (n_len,) = struct.unpack(">I", take(4))
        name = take(n_len)
        (v_len,) = struct.unpack(">I", take(4))
        value = take(v_len)
        if not name:
            raise SpdyError("empty header name")
        key = name.decode(errors="replace").lower()
        values = value.decode(errors="replace").split("\x00")
        headers.setdefault(key, []).extend(values)
    if pos != len(view):
        raise SpdyError(f"{len(view) - pos} bytes after the header block")
    return headers


class HeaderCompressor:
    """One deflate context for every header block sent on a session, as SPDY/3 requires."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8,
                                   zlib.Z_DEFAULT_STRATEGY, HEADER_DICTIONARY)

    def compress(self, block: bytes) -> bytes:
        return self._z.compress(block) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """One inflate context for every header block received on a session."""

    def __init__(self, limit: int = MAX_HEADER_BLOCK) -> None:
        self._z = zlib.decompressobj(15, HEADER_DICTIONARY)
        self._limit = limit

    def decompress(self, data: bytes) -> bytes:
        try:
            out = self._z.decompress(data, self._limit + 1)
        except zlib.error as e:
            raise SpdyError(f"header block does not inflate: {e}") from None
        if len(out) > self._limit or self._z.unconsumed_tail:
            raise SpdyError(f"inflated header block over {self._limit} bytes")
        if self._z.eof:
            raise SpdyError("header block ended the session's zlib stream")
        return out


class FrameEncoder:
    """Frames to bytes; owns the session's outgoing header compression context."""

    def __init__(self) -> None:
        self._compressor = HeaderCompressor()

    @staticmethod
    def _control(ftype: int, flags: int, payload: bytes) -> bytes:
        if len(payload) > MAX_FRAME_PAYLOAD:
            raise ValueError("control frame too large")
        return struct.pack(">HHI", 0x8000 | VERSION, ftype, (flags << 24) | len(payload)) + payload

    @staticmethod
    def data(stream_id: int, data: bytes = b"", fin: bool = False) -> bytes:
        if not 0 < stream_id <= MAX_STREAM_ID or len(data) > MAX_FRAME_PAYLOAD:
            raise ValueError("bad DATA frame")
        return struct.pack(">II", stream_id, ((FLAG_FIN if fin else 0) << 24) | len(data)) + data

    def _block(self, headers: HeadersIn) -> bytes:
        return self._compressor.compress(encode_header_block(headers))

    def encode(self, frame: Frame) -> bytes:
        if isinstance(frame, DataFrame):
            if not 0 < frame.stream_id <= MAX_STREAM_ID or len(frame.data) > MAX_FRAME_PAYLOAD:
                raise ValueError("bad DATA frame")
            return struct.pack(">II", frame.stream_id, (frame.flags << 24) | len(frame.data)) + frame.data
        if isinstance(frame, SynStreamFrame):
            payload = struct.pack(">IIBB", frame.stream_id, frame.associated_stream_id,
                                  (frame.priority & 7) << 5, frame.slot) + self._block(frame.headers)
            return self._control(SYN_STREAM, frame.flags, payload)
        if isinstance(frame, SynReplyFrame):
            return self._control(SYN_REPLY, frame.flags,
                                 struct.pack(">I", frame.stream_id) + self._block(frame.headers))
        if isinstance(frame, HeadersFrame):
            return self._control(HEADERS, frame.flags,
                                 struct.pack(">I", frame.stream_id) + self._block(frame.headers))
        if isinstance(frame, RstStreamFrame):
            return self._control(RST_STREAM, 0, struct.pack(">II", frame.stream_id, frame.status))
        if isinstance(frame, SettingsFrame):
            payload = struct.pack(">I", len(frame.settings)) + b"".join(
                struct.pack(">II", (s.flags << 24) | s.id, s.value) for s in frame.settings)
            return self._control(SETTINGS, frame.flags, payload)
        if isinstance(frame, PingFrame):
            return self._control(PING, 0, struct.pack(">I", frame.ping_id))
        if isinstance(frame, GoAwayFrame):
            return self._control(GOAWAY, 0, struct.pack(">II", frame.last_good_stream_id, frame.status))
        if isinstance(frame, WindowUpdateFrame):
            return self._control(WINDOW_UPDATE, 0, struct.pack(">II", frame.stream_id, frame.delta))
        raise TypeError(f"not a SPDY frame: {frame!r}")


@dataclass(frozen=True)
class FrameHead:
    """The 8-byte common header: what to read next and how to parse it."""

    control: bool
    type: int  # control frame type (0 for DATA)
    stream_id: int  # DATA only
    version: int  # control only
    flags: int
    length: int


class FrameDecoder:
    """Bytes to frames; owns the session's incoming header decompression context.

    `feed()` is the sans-IO entry (any chunking); the session reads `parse_head()`'s 8 bytes and
    `length` more itself and calls `decode()`. Malformed input raises SpdyError; a control frame of
    an unknown type decodes to None (SPDY says to ignore it)."""

    def __init__(self, max_control_payload: int = MAX_CONTROL_PAYLOAD,
                 max_data_payload: int = MAX_FRAME_PAYLOAD) -> None:
        self._inflate = HeaderDecompressor()
        self.max_control_payload = max_control_payload
        self.max_data_payload = max_data_payload
        self._buf = bytearray()

    def parse_head(self, head: bytes) -> FrameHead:
        word, flags_len = struct.unpack(">II", head)
        flags, length = flags_len >> 24, flags_len & 0xFFFFFF
        if word & 0x80000000:
            fh = FrameHead(True, word & 0xFFFF, 0, (word >> 16) & 0x7FFF, flags, length)
            if fh.version != VERSION:
                raise SpdyError(f"SPDY version {fh.version} (want {VERSION})")
            if length > self.max_control_payload:
                raise SpdyError(f"control frame of {length} bytes (limit {self.max_control_payload})")
            return fh
        if length > self.max_data_payload:
            raise SpdyError(f"DATA frame of {length} bytes (limit {self.max_data_payload})")
        return FrameHead(False, 0, word & 0x7FFFFFFF, 0, flags, length)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= 8:
            head = self.parse_head(bytes(self._buf[:8]))
            if len(self._buf) < 8 + head.length:
                break
            payload = bytes(self._buf[8:8 + head.length])
            del self._buf[:8 + head.length]
            frame = self.decode(head, payload)
            if frame is not None:
                frames.append(frame)
        return frames

    def decode(self, head: FrameHead, payload: bytes) -> Frame | None:
        if len(payload) != head.length:
            raise SpdyError("short frame")
        if not head.control:
            if head.stream_id == 0:
                raise SpdyError("DATA frame on stream 0")
            return DataFrame(head.stream_id, payload, head.flags)
        t, n = head.type, head.length
        if t == SYN_STREAM:
            if n < 10:
                raise SpdyError("SYN_STREAM too short")
            sid, assoc, prio, slot = struct.unpack(">IIBB", payload[:10])
            headers = self._headers(payload[10:])
            sid &= MAX_STREAM_ID
            if sid == 0:
                raise SpdyError("SYN_STREAM for stream 0")
            return SynStreamFrame(sid, headers, head.flags, assoc & MAX_STREAM_ID, prio >> 5, slot)
        if t in (SYN_REPLY, HEADERS):
            if n < 4:
                raise SpdyError("SYN_REPLY/HEADERS too short")
            sid = struct.unpack(">I", payload[:4])[0] & MAX_STREAM_ID
            headers = self._headers(payload[4:])
            if sid == 0:
                raise SpdyError("SYN_REPLY/HEADERS for stream 0")
            cls = SynReplyFrame if t == SYN_REPLY else HeadersFrame
            return cls(sid, headers, head.flags)
        if t == RST_STREAM:
            if n != 8:
                raise SpdyError("RST_STREAM length is not 8")
            sid, status = struct.unpack(">II", payload)
            sid &= MAX_STREAM_ID
            if sid == 0 or status == 0:
                raise SpdyError("RST_STREAM for stream 0 or with status 0")
            return RstStreamFrame(sid, status)
        if t == SETTINGS:
            if n < 4:
                raise SpdyError("SETTINGS too short")
            (count,) = struct.unpack(">I", payload[:4])
            if n != 4 + 8 * count:
                raise SpdyError(f"SETTINGS of {n} bytes for {count} entries")
            settings = []
            for off in range(4, n, 8):
                fid, value = struct.unpack(">II", payload[off:off + 8])
                settings.append(Setting(fid & 0xFFFFFF, value, fid >> 24))
            return SettingsFrame(settings, head.flags)
        if t == PING:
            if n != 4:
                raise SpdyError("PING length is not 4")
            return PingFrame(struct.unpack(">I", payload)[0])
        if t == GOAWAY:
            if n != 8:
                raise SpdyError("GOAWAY length is not 8")
            last, status = struct.unpack(">II", payload)
            return GoAwayFrame(last & MAX_STREAM_ID, status)
        if t == WINDOW_UPDATE:
            if n != 8:
                raise SpdyError("WINDOW_UPDATE length is not 8")
            sid, delta = struct.unpack(">II", payload)
            return WindowUpdateFrame(sid & MAX_STREAM_ID, delta & MAX_WINDOW)
        return None  # unknown (or SPDY/3's CREDENTIAL): ignored

    def _headers(self, compressed: bytes) -> Headers:
        return decode_header_block(self._inflate.decompress(compressed))


# ---------------------------------------------------------------------------------------------
# the session


class Reader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...


class SpdyStream:
    """One stream: DATA in (read), DATA out (write), half-close (close) and reset."""

    def __init__(self, session: SpdySession, stream_id: int, headers: Headers, *,
                 send_window: int, recv_window: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self.header_values: Headers = headers
        # first value of each, as Go's Header.Get
        self.headers: dict[str, str] = {k: (v[0] if v else "") for k, v in headers.items()}
        self.remote_closed = False  # peer sent FIN or RST (or the session ended)
        self.local_closed = False  # we sent FIN or RST
        self.reset_status: int | None = None  # set once reset either way
        self.replied = asyncio.Event()  # SYN_REPLY seen (streams we opened) or sent
        self._settled = asyncio.Event()  # replied, reset or session ended: open_stream() returns
        self._chunks: deque[bytes] = deque()
        self.buffered = 0
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.send_window = send_window
        self.recv_window = recv_window  # what we granted and the peer has not used yet
        self._recv_limit = recv_window
        self._unacked = 0  # consumed since our last WINDOW_UPDATE

    def __repr__(self) -> str:
        return f"<SpdyStream {self.stream_id} {self.headers}>"

    async def read(self) -> bytes:
        """The next DATA payload; b"" after the peer's FIN (all data read), a reset, or session end."""
        while True:
            if self.reset_status is not None:
                return b""
            if self._chunks:
                chunk = self._chunks.popleft()
                self._consumed(len(chunk))
                return chunk
            if self.remote_closed:
                return b""
            self._readable.clear()
            await self._readable.wait()

    async def write(self, data: bytes) -> None:
        """Sends data as DATA frames, waiting on the send window where the peer does flow control."""
        view = memoryview(data)
        s = self._session
        while True:
            self._check_writable()
            if not view:
                return
            n = await s._reserve(self, len(view))
            self._check_writable()
            s._send(FrameEncoder.data(self.stream_id, bytes(view[:n])))
            view = view[n:]
            await s._drain()

    async def close(self) -> None:
        """Half-closes our side (an empty DATA with FLAG_FIN); idempotent."""
        if self.local_closed or self._session._ended:
            return
        self.local_closed = True
        self._session._send(FrameEncoder.data(self.stream_id, b"", fin=True))
        self._session._maybe_forget(self)
        await self._session._drain()

    def reset(self, status: int = CANCEL) -> None:
        """Aborts the stream both ways (RST_STREAM); unread data is dropped."""
        if self.reset_status is not None:
            return
        if not (self.local_closed and self.remote_closed) and not self._session._ended:
            self._session._send_frame(RstStreamFrame(self.stream_id, status))
        self._terminate(status)

    def _check_writable(self) -> None:
        if self.reset_status is not None:
            raise StreamReset(self.stream_id, self.reset_status)
        if self.local_closed:
            raise StreamReset(self.stream_id, STREAM_ALREADY_CLOSED, f"SPDY stream {self.stream_id} is closed")
        if self._session._ended:
            raise StreamReset(self.stream_id, CANCEL, "SPDY session closed")

    def _terminate(self, status: int) -> None:
        """Reset (either side) or session end: wakes everyone, drops what was not read."""
        self.reset_status = status
        self.remote_closed = self.local_closed = True
        dropped = self.buffered
        self._chunks.clear()
        self.buffered = 0
        self._readable.set()
        self._room.set()
        self._settled.set()
        self._session._forget(self)
        if dropped:
            self._session._credit_session(dropped)
        self._session._wake_writers()

    def _session_ended(self) -> None:
        """No more frames either way; what was received can still be read."""
        self.remote_closed = True
        self._readable.set()
        self._room.set()
        self._settled.set()

    def _feed(self, data: bytes, fin: bool) -> None:
        if data:
            self._chunks.append(data)
            self.buffered += len(data)
            self.recv_window -= len(data)
            if self.buffered >= self._recv_limit:
                self._room.clear()
        if fin:
            self.remote_closed = True
        self._readable.set()

    def _consumed(self, n: int) -> None:
        self.buffered -= n
        if self.buffered < self._recv_limit:
            self._room.set()
        s = self._session
        s._credit_session(n)
        if self.remote_closed or s._ended:
            return
        self._unacked += n
        if self._unacked >= self._recv_limit // 2:
            s._send_frame(WindowUpdateFrame(self.stream_id, self._unacked))
            self.recv_window += self._unacked
            self._unacked = 0


class SpdySession:
    """A SPDY/3.1 session over one connection.

    `run()` is the frame loop (start it as a task); `accept()` yields the streams the peer opens,
    `open_stream()` opens one. server=True: the peer opens odd stream ids, we even (and the
    reverse for a client). `idle_timeout`: no frame either way for that long closes the session.
    `flow_control`: "auto" waits on the send window once the peer shows it does flow control
    (spdystream does not, see the module doc); True always, False never."""

    def __init__(self, reader: Reader, writer: Writer, *, server: bool = True,
                 idle_timeout: float | None = None, initial_window: int = DEFAULT_WINDOW,
                 session_window: int = 1 << 20, max_concurrent_streams: int = 1000,
                 flow_control: bool | str = "auto") -> None:
        if not 0 < initial_window <= MAX_WINDOW or not DEFAULT_WINDOW <= session_window <= MAX_WINDOW:
            raise ValueError("bad window size")
        self._reader = reader
        self._writer = writer
        self.server = server
        self.idle_timeout = idle_timeout
        self.closed = asyncio.Event()
        self._encoder = FrameEncoder()
        self._decoder = FrameDecoder()
        self._streams: dict[int, SpdyStream] = {}
        self._accept_q: asyncio.Queue[SpdyStream | None] = asyncio.Queue()
        self._next_id = 2 if server else 1
        self._last_peer_id = 0  # highest stream id the peer opened
        self._next_ping = 2 if server else 1
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._recv_initial = initial_window
        self._recv_session_limit = session_window
        self._session_unacked = 0
        self._send_initial = DEFAULT_WINDOW
        self.send_window = DEFAULT_WINDOW  # the session-level window the peer granted us
        self.max_concurrent_streams = max_concurrent_streams
        self.peer_max_concurrent_streams: int | None = None
        self._flow_mode = flow_control
        self.peer_flow_control = flow_control is True
        self._window_changed = asyncio.Event()
        self._drain_lock = asyncio.Lock()
        self._ended = False  # no more frames out: session closed
        self._going_away = False  # GOAWAY sent or received: no new streams
        self._peer_gone_away = False
        self._run_task: asyncio.Task | None = None
        self._shutting_down = False
        self._unflushed = 0  # bytes written since the last drain
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._last_activity = loop.time()
        self.frames_in = 0
        self.frames_out = 0
        self.goaway_received: GoAwayFrame | None = None

    # -- public API --------------------------------------------------------------------------

    async def run(self) -> None:
        """The frame loop, until GOAWAY with no streams left, EOF, an error, or close()."""
        self._run_task = asyncio.current_task()
        idle = asyncio.create_task(self._idle_watch()) if self.idle_timeout else None
        status = GOAWAY_OK
        try:
            self._send_frame(SettingsFrame([
                Setting(SETTINGS_MAX_CONCURRENT_STREAMS, self.max_concurrent_streams),
                Setting(SETTINGS_INITIAL_WINDOW_SIZE, self._recv_initial),
            ]))
            if self._recv_session_limit > DEFAULT_WINDOW:
                self._send_frame(WindowUpdateFrame(0, self._recv_session_limit - DEFAULT_WINDOW))
            await self._drain()
            while not self._ended:
                head = self._decoder.parse_head(await self._reader.readexactly(8))
                payload = await self._reader.readexactly(head.length) if head.length else b""
                self._last_activity = self._loop.time()
                self.frames_in += 1
                frame = self._decoder.decode(head, payload)
                if frame is not None:
                    await self._handle(frame)
                if self._unflushed > MAX_UNFLUSHED:
                    # replies (PING, RST, WINDOW_UPDATE) to a peer that does not read: push back
                    await self._drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            log.debug("SPDY session: connection ended: %r", e)
        except SpdyError as e:
            log.warning("SPDY session: protocol error from the peer: %s", e)
            status = e.status
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not (self._ended and task is not None and task.uncancel() == 0):
                raise
        except Exception:
            log.exception("SPDY session: internal error")
            status = GOAWAY_INTERNAL_ERROR
        finally:
            if idle is not None:
                idle.cancel()
            self._run_task = None
            await self._shutdown(status)

    async def accept(self) -> SpdyStream | None:
        """The next stream the peer opened; None once the session ended or the peer went away."""
        if self._accept_q.empty() and (self._ended or self._peer_gone_away):
            return None
        stream = await self._accept_q.get()
        if stream is None:
            self._accept_q.put_nowait(None)  # for every later accept()
        return stream

    async def open_stream(self, headers: HeadersIn, fin: bool = False) -> SpdyStream:
        """Opens a stream (SYN_STREAM) and waits for the peer's SYN_REPLY."""
        if self._ended or self._going_away:
            raise StreamReset(0, REFUSED_STREAM, "SPDY session is going away")
        sid = self._next_id
        if sid > MAX_STREAM_ID:
            raise StreamReset(0, REFUSED_STREAM, "SPDY stream ids exhausted")
        self._next_id += 2
        norm = normalize_headers(headers)
        stream = SpdyStream(self, sid, norm, send_window=self._send_initial,
                            recv_window=self._recv_initial)
        stream.local_closed = fin
        self._streams[sid] = stream
        self._send_frame(SynStreamFrame(sid, norm, FLAG_FIN if fin else 0))
        await self._drain()
        await stream._settled.wait()
        if stream.reset_status is not None:
            raise StreamReset(sid, stream.reset_status)
        if not stream.replied.is_set():
            raise StreamReset(sid, CANCEL, "SPDY session closed")
        return stream

    async def ping(self) -> float:
        """Round trip of a PING, in seconds."""
        pid = self._next_ping
        self._next_ping = pid + 2 if pid + 2 <= 0x7FFFFFFF else (2 if self.server else 1)
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pings[pid] = fut
        start = self._loop.time()
        try:
            self._send_frame(PingFrame(pid))
            await self._drain()
            await fut
        finally:
            self._pings.pop(pid, None)
        return self._loop.time() - start

    async def close(self) -> None:
        """GOAWAY(OK), then closes the writer; every stream ends. Idempotent."""
        await self._shutdown(GOAWAY_OK)

    @property
    def streams(self) -> dict[int, SpdyStream]:
        """The live streams (not yet closed both ways nor reset)."""
        return dict(self._streams)

    # -- frame handling -------------------------------------------------------------------------

    async def _handle(self, frame: Frame) -> None:
        if isinstance(frame, DataFrame):
            await self._on_data(frame)
        elif isinstance(frame, SynStreamFrame):
            self._on_syn_stream(frame)
        elif isinstance(frame, SynReplyFrame):
            stream = self._streams.get(frame.stream_id)
            if stream is not None and not stream.replied.is_set() and self._is_ours(frame.stream_id):
                stream.replied.set()
                stream._settled.set()
                if frame.flags & FLAG_FIN:
                    self._remote_fin(stream)
        elif isinstance(frame, HeadersFrame):
            stream = self._streams.get(frame.stream_id)
            if stream is not None:
                for k, v in frame.headers.items():
                    stream.header_values.setdefault(k, []).extend(v)
                    stream.headers.setdefault(k, v[0] if v else "")
                if frame.flags & FLAG_FIN:
                    self._remote_fin(stream)
        elif isinstance(frame, RstStreamFrame):
            stream = self._streams.get(frame.stream_id)
            if stream is not None:
                stream._terminate(frame.status)
        elif isinstance(frame, SettingsFrame):
            self._on_settings(frame)
        elif isinstance(frame, PingFrame):
            if (frame.ping_id & 1) != (self._next_ping & 1):
                self._send_frame(frame)  # the peer's: echo it
            else:
                fut = self._pings.get(frame.ping_id)
                if fut is not None and not fut.done():
                    fut.set_result(None)
        elif isinstance(frame, GoAwayFrame):
            self._on_goaway(frame)
        elif isinstance(frame, WindowUpdateFrame):
            self._on_window_update(frame)

    def _is_ours(self, sid: int) -> bool:
        return (sid & 1) == (0 if self.server else 1)

    def _on_syn_stream(self, frame: SynStreamFrame) -> None:
        sid = frame.stream_id
        if self._is_ours(sid) or sid <= self._last_peer_id:
            raise SpdyError(f"SYN_STREAM with stream id {sid} (last {self._last_peer_id})")
        self._last_peer_id = sid
        if self._going_away:
            self._send_frame(RstStreamFrame(sid, REFUSED_STREAM))
            return
        if sum(1 for s in self._streams if not self._is_ours(s)) >= self.max_concurrent_streams:
            self._send_frame(RstStreamFrame(sid, REFUSED_STREAM))
            return
        stream = SpdyStream(self, sid, frame.headers, send_window=self._send_initial,
                            recv_window=self._recv_initial)
        self._streams[sid] = stream
        if frame.flags & FLAG_UNIDIRECTIONAL:
            stream.local_closed = True  # nothing may be sent back, not even SYN_REPLY
        else:
            self._send_frame(SynReplyFrame(sid, {}))
        stream.replied.set()
        stream._settled.set()
        if frame.flags & FLAG_FIN:
            self._remote_fin(stream)
        self._accept_q.put_nowait(stream)

    async def _on_data(self, frame: DataFrame) -> None:
        n = len(frame.data)
        stream = self._streams.get(frame.stream_id)
        if stream is None or stream.remote_closed:
            if n:
                self._credit_session(n)  # nobody will read it: give the window back
            sid = frame.stream_id
            opened = sid <= (self._next_id - 2 if self._is_ours(sid) else self._last_peer_id)
            if stream is not None:
                stream.reset(STREAM_ALREADY_CLOSED)
            elif not opened:
                self._send_frame(RstStreamFrame(sid, INVALID_STREAM))
            return  # data after our reset or for a finished stream: dropped
        if n and not stream._room.is_set():
            # the peer overran the window we granted (spdystream ignores windows): stop reading
            # the connection until the application has read this stream down
            await stream._room.wait()
            if stream.reset_status is not None or self._ended:
                self._credit_session(n)
                return
        stream._feed(frame.data, frame.fin)
        if frame.fin:
            self._maybe_forget(stream)

    def _on_settings(self, frame: SettingsFrame) -> None:
        window = frame.get(SETTINGS_INITIAL_WINDOW_SIZE)
        if window is not None:
            if window > MAX_WINDOW:
                raise SpdyError(f"SETTINGS_INITIAL_WINDOW_SIZE {window}")
            delta = window - self._send_initial
            self._send_initial = window
            for stream in self._streams.values():
                stream.send_window += delta
            self._enable_flow_control()
            self._wake_writers()
        streams = frame.get(SETTINGS_MAX_CONCURRENT_STREAMS)
        if streams is not None:
            self.peer_max_concurrent_streams = streams

    def _on_window_update(self, frame: WindowUpdateFrame) -> None:
        self._enable_flow_control()
        if frame.delta == 0:
            return
        if frame.stream_id == 0:
            self.send_window += frame.delta
            if self.send_window > MAX_WINDOW:
                raise SpdyError("session window over 2^31-1")
        else:
            stream = self._streams.get(frame.stream_id)
            if stream is None:
                return
            stream.send_window += frame.delta
            if stream.send_window > MAX_WINDOW:
                stream.reset(FLOW_CONTROL_ERROR)
        self._wake_writers()

    def _on_goaway(self, frame: GoAwayFrame) -> None:
        self.goaway_received = frame
        self._going_away = self._peer_gone_away = True
        # streams we opened that the peer never processed will not be
        for sid, stream in list(self._streams.items()):
            if self._is_ours(sid) and sid > frame.last_good_stream_id:
                stream._terminate(REFUSED_STREAM)
        self._accept_q.put_nowait(None)
        self._check_done()

    def _check_done(self) -> None:
        """After the peer's GOAWAY the session ends with its last stream."""
        if self._peer_gone_away and not self._streams and not self._ended:
            self._loop.create_task(self._shutdown(GOAWAY_OK))

    def _enable_flow_control(self) -> None:
        if self._flow_mode == "auto" and not self.peer_flow_control:
            self.peer_flow_control = True
            log.debug("SPDY session: the peer does flow control")

    # -- helpers for the streams ----------------------------------------------------------------

    def _remote_fin(self, stream: SpdyStream) -> None:
        stream.remote_closed = True
        stream._readable.set()
        self._maybe_forget(stream)

    def _maybe_forget(self, stream: SpdyStream) -> None:
        if stream.local_closed and stream.remote_closed:
            self._forget(stream)

    def _forget(self, stream: SpdyStream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            self._check_done()

    def _credit_session(self, n: int) -> None:
        if self._ended:
            return
        self._session_unacked += n
        if self._session_unacked >= self._recv_session_limit // 2:
            self._send_frame(WindowUpdateFrame(0, self._session_unacked))
            self._session_unacked = 0

    def _wake_writers(self) -> None:
        self._window_changed.set()
        self._window_changed = asyncio.Event()

    async def _reserve(self, stream: SpdyStream, want: int) -> int:
        """How much of `want` may go out now (waits on the windows when they are enforced)."""
        while True:
            stream._check_writable()
            allowed = min(want, DATA_CHUNK)
            if not self.peer_flow_control or self._flow_mode is False:
                break
            room = min(stream.send_window, self.send_window)
            if room > 0:
                allowed = min(allowed, room)
                break
            await self._window_changed.wait()
        stream.send_window -= allowed
        self.send_window -= allowed
        return allowed

    def _send_frame(self, frame: Frame) -> None:
        self._send(self._encoder.encode(frame))

    def _send(self, data: bytes) -> None:
        """Encoding and writing happen with no await in between, so header blocks reach the wire in
        the order they were compressed."""
        if self._ended:
            return
        try:
            self._writer.write(data)
        except Exception as e:  # a transport that is gone
            log.debug("SPDY session: write failed: %r", e)
            self._ended = True
            self._loop.create_task(self._shutdown(GOAWAY_OK))
            return
        self.frames_out += 1
        self._unflushed += len(data)
        self._last_activity = self._loop.time()

    async def _drain(self) -> None:
        if self._ended:
            return
        try:
            async with self._drain_lock:
                await self._writer.drain()
                self._unflushed = 0
        except (ConnectionError, OSError, RuntimeError) as e:
            log.debug("SPDY session: drain failed: %r", e)
            self._loop.create_task(self._shutdown(GOAWAY_OK))

    async def _idle_watch(self) -> None:
        assert self.idle_timeout
        while not self._ended:
            left = self._last_activity + self.idle_timeout - self._loop.time()
            if left <= 0:
                log.info("SPDY session idle for %.0fs: closing", self.idle_timeout)
                await self._shutdown(GOAWAY_OK)
                return
            await asyncio.sleep(left)

    async def _shutdown(self, status: int) -> None:
        if self._shutting_down:
            if not self.closed.is_set():
                await self.closed.wait()
            return
        self._shutting_down = True
        if not self._ended:
            self._going_away = True
            self._send_frame(GoAwayFrame(self._last_peer_id, status))
            try:
                await asyncio.wait_for(self._drain(), 5.0)
            except (asyncio.TimeoutError, Exception):
                pass
        self._ended = True
        for stream in list(self._streams.values()):
            stream._session_ended()
        self._streams.clear()
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(ConnectionResetError("SPDY session closed"))
        self._accept_q.put_nowait(None)
        self._wake_writers()
        try:
            self._writer.close()
        except Exception as e:
            log.debug("SPDY session: close failed: %r", e)
        self.closed.set()
        task = self._run_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
