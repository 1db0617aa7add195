"""SPDY/3.1: the frame layer, the session (flow control, reset, GOAWAY, PING, bad input, idle
timeout) and the real Kubernetes client (recorded frames in tests/data/spdy/, and live runs of
contrib/tools/spdy-recorder, client-go's remotecommand over spdystream)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
import struct
import zlib
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest

from pycrio.streaming import spdy
from pycrio.streaming.spdy import (
    CANCEL,
    FLAG_FIN,
    FLAG_UNIDIRECTIONAL,
    GOAWAY_OK,
    GOAWAY_PROTOCOL_ERROR,
    HEADER_DICTIONARY,
    REFUSED_STREAM,
    SETTINGS_INITIAL_WINDOW_SIZE,
    DataFrame,
    FrameDecoder,
    FrameEncoder,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    Setting,
    SettingsFrame,
    SpdyError,
    SpdySession,
    SpdyStream,
    StreamReset,
    SynReplyFrame,
    SynStreamFrame,
    WindowUpdateFrame,
)
from tests.spdy_record import DATA, ExecServer, ForwardServer, build_client, pattern, run_client


def run(coro: Awaitable[Any], timeout: float = 30) -> Any:
    async def main() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


def frames_of(data: bytes) -> list[spdy.Frame]:
    return FrameDecoder().feed(data)


# ---------------------------------------------------------------------------------------------
# frame layer


def test_dictionary_is_the_spdy3_one() -> None:
    # the zlib dictionary id every SPDY/3 header block names (and spdystream checks)
    assert len(HEADER_DICTIONARY) == 1423
    assert zlib.adler32(HEADER_DICTIONARY) == 0xE3C6A7C2
    first = FrameEncoder().encode(SynReplyFrame(1, {}))
    assert struct.unpack(">I", first[14:18])[0] == 0xE3C6A7C2  # after the zlib header's 2 bytes


ALL_FRAMES = [
    DataFrame(1, b"hello"),
    DataFrame(3, b"", FLAG_FIN),
    DataFrame(2**31 - 1, b"x" * 70000),
    SynStreamFrame(1, {"streamtype": ["error"]}),
    SynStreamFrame(5, {"streamtype": ["data"], "port": ["8080"], "requestid": ["0"]},
                   FLAG_FIN | FLAG_UNIDIRECTIONAL, associated_stream_id=3, priority=7, slot=2),
    SynReplyFrame(1, {}),
    SynReplyFrame(7, {"x-multi": ["a", "b", ""]}, FLAG_FIN),
    RstStreamFrame(9, spdy.CANCEL),
    RstStreamFrame(11, spdy.FRAME_TOO_LARGE),
    SettingsFrame([Setting(SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20),
                   Setting(spdy.SETTINGS_MAX_CONCURRENT_STREAMS, 100, spdy.FLAG_SETTINGS_PERSIST_VALUE)],
                  spdy.FLAG_SETTINGS_CLEAR_SETTINGS),
    SettingsFrame([]),
    PingFrame(1),
    PingFrame(0xFFFFFFFF),
    GoAwayFrame(7, GOAWAY_OK),
    GoAwayFrame(0, GOAWAY_PROTOCOL_ERROR),
    HeadersFrame(3, {"trailer": ["yes"]}, FLAG_FIN),
    WindowUpdateFrame(0, 983040),
    WindowUpdateFrame(5, 2**31 - 1),
]


@pytest.mark.parametrize("frame", ALL_FRAMES, ids=lambda f: type(f).__name__)
def test_every_frame_type_round_trips(frame: spdy.Frame) -> None:
    wire = FrameEncoder().encode(frame)
    assert FrameDecoder().feed(wire) == [frame]


def test_wire_format_of_fixed_frames() -> None:
    enc = FrameEncoder()
    assert enc.encode(PingFrame(1)).hex() == "8003000600000004" "00000001"
    assert enc.encode(RstStreamFrame(3, CANCEL)).hex() == "8003000300000008" "00000003" "00000005"
    assert enc.encode(WindowUpdateFrame(0, 0x10000)).hex() == "8003000900000008" "00000000" "00010000"
    assert enc.encode(GoAwayFrame(5, 1)).hex() == "8003000700000008" "00000005" "00000001"
    assert enc.encode(DataFrame(3, b"ab", FLAG_FIN)).hex() == "00000003" "01000002" "6162"
    assert (enc.encode(SettingsFrame([Setting(7, 65536)])).hex()
            == "800300040000000c" "00000001" "00000007" "00010000")
    syn = enc.encode(SynStreamFrame(1, {"a": "b"}, FLAG_FIN, priority=3))
    assert syn[:4].hex() == "80030001" and syn[4] == FLAG_FIN
    assert syn[8:18].hex() == "00000001" "00000000" "6000"


def test_header_block_format() -> None:
    raw = spdy.encode_header_block({"StreamType": "stdin", "multi": ["x", "y"]})
    assert raw == (struct.pack(">I", 2) + struct.pack(">I", 10) + b"streamtype" + struct.pack(">I", 5)
                   + b"stdin" + struct.pack(">I", 5) + b"multi" + struct.pack(">I", 3) + b"x\x00y")
    assert spdy.decode_header_block(raw) == {"streamtype": ["stdin"], "multi": ["x", "y"]}


def test_header_compression_is_one_context_per_session() -> None:
    enc, dec = FrameEncoder(), FrameDecoder()
    blocks = [{"streamtype": ["error"]}, {"streamtype": ["stdin"]}, {"streamtype": ["stdout"]},
              {"streamtype": ["stdout"]}, {"streamtype": ["data"], "port": ["80"], "requestid": ["1"]}]
    wires = [enc.encode(SynStreamFrame(2 * i + 1, h)) for i, h in enumerate(blocks)]
    # the repeated block refers back into the shared window: much smaller than the first
    assert len(wires[3]) < len(wires[0]) - 5
    decoded = [f for w in wires for f in dec.feed(w)]
    assert [f.headers for f in decoded] == blocks  # type: ignore[union-attr]
    # a later block cannot be inflated without the blocks before it (no per-block reset)
    with pytest.raises(SpdyError):
        FrameDecoder().feed(wires[3])
    # and it is plain zlib with the dictionary and a sync flush per block
    z = zlib.decompressobj(zdict=HEADER_DICTIONARY)
    for w, h in zip(wires, blocks):
        assert spdy.decode_header_block(z.decompress(w[18:])) == h
        assert w.endswith(b"\x00\x00\xff\xff")


def test_decoder_takes_any_chunking() -> None:
    enc = FrameEncoder()
    wire = b"".join(enc.encode(f) for f in ALL_FRAMES)
    dec = FrameDecoder()
    out: list[spdy.Frame] = []
    for i in range(len(wire)):
        out += dec.feed(wire[i:i + 1])
    assert out == ALL_FRAMES


def test_unknown_control_frame_is_ignored() -> None:
    unknown = struct.pack(">HHI", 0x8003, 10, 4) + b"abcd"  # SPDY/3 CREDENTIAL, gone in 3.1
    assert FrameDecoder().feed(unknown + FrameEncoder().encode(PingFrame(3))) == [PingFrame(3)]


def _ctl(ftype: int, payload: bytes, flags: int = 0, version: int = 3) -> bytes:
    return struct.pack(">HHI", 0x8000 | version, ftype, (flags << 24) | len(payload)) + payload


def _bomb() -> bytes:
    z = zlib.compressobj(zdict=HEADER_DICTIONARY)
    block = struct.pack(">I", 1) + struct.pack(">I", 1) + b"a" + struct.pack(">I", 2 << 20) + b"v" * (2 << 20)
    return _ctl(spdy.SYN_REPLY, struct.pack(">I", 1) + z.compress(block) + z.flush(zlib.Z_SYNC_FLUSH))


def _compressed(block: bytes) -> bytes:
    z = zlib.compressobj(zdict=HEADER_DICTIONARY)
    return z.compress(block) + z.flush(zlib.Z_SYNC_FLUSH)


MALFORMED = {
    "version 2": _ctl(spdy.PING, b"\0\0\0\1", version=2),
    "ping length": _ctl(spdy.PING, b"\0\0\0\1\0"),
    "rst length": _ctl(spdy.RST_STREAM, b"\0\0\0\1"),
    "rst stream 0": _ctl(spdy.RST_STREAM, struct.pack(">II", 0, 5)),
    "rst status 0": _ctl(spdy.RST_STREAM, struct.pack(">II", 1, 0)),
    "goaway length": _ctl(spdy.GOAWAY, b"\0\0\0\1"),
    "window length": _ctl(spdy.WINDOW_UPDATE, b"\0\0\0\1\0\0\0\1\0"),
    "settings count": _ctl(spdy.SETTINGS, struct.pack(">III", 2, 7, 1)),
    "syn short": _ctl(spdy.SYN_STREAM, b"\0\0\0\1"),
    "syn stream 0": _ctl(spdy.SYN_STREAM, struct.pack(">IIBB", 0, 0, 0, 0) + _compressed(struct.pack(">I", 0))),
    "data stream 0": struct.pack(">II", 0, 1) + b"x",
    "not zlib": _ctl(spdy.SYN_REPLY, struct.pack(">I", 1) + b"garbage!"),
    "no dictionary": _ctl(spdy.SYN_REPLY, struct.pack(">I", 1) + zlib.compress(struct.pack(">I", 0))),
    "truncated block": _ctl(spdy.SYN_REPLY, struct.pack(">I", 1) + _compressed(struct.pack(">II", 1, 9) + b"abc")),
    "trailing bytes": _ctl(spdy.SYN_REPLY, struct.pack(">I", 1) + _compressed(struct.pack(">I", 0) + b"zz")),
    "too many headers": _ctl(spdy.SYN_REPLY, struct.pack(">I", 1) + _compressed(struct.pack(">I", 5000))),
    "empty name": _ctl(spdy.SYN_REPLY, struct.pack(">I", 1) + _compressed(struct.pack(">III", 1, 0, 0))),
    "inflates too far": _bomb(),
    "control too large": struct.pack(">HHI", 0x8003, spdy.HEADERS, (1 << 20) + 1),
}


@pytest.mark.parametrize("wire", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_raise(wire: bytes) -> None:
    with pytest.raises(SpdyError):
        FrameDecoder().feed(wire + b"\0" * 64)


# ---------------------------------------------------------------------------------------------
# frames recorded from the real client (tests/data/spdy/README.md)


def test_recorded_client_exec_frames_decode() -> None:
    frames = frames_of((DATA / "exec-stdin.client.bin").read_bytes())
    syns = [f for f in frames if isinstance(f, SynStreamFrame)]
    assert [(f.stream_id, f.headers) for f in syns] == [
        (1, {"streamtype": ["error"]}), (3, {"streamtype": ["stdin"]}),
        (5, {"streamtype": ["stdout"]}), (7, {"streamtype": ["stderr"]})]
    assert all(f.flags == 0 and f.priority == 0 and f.associated_stream_id == 0 for f in syns)
    data = [f for f in frames if isinstance(f, DataFrame)]
    assert data[0] == DataFrame(3, pattern(11))
    assert data[1] == DataFrame(3, b"", FLAG_FIN)  # spdystream's Close(): an empty DATA with FIN
    # spdystream sends no SETTINGS and no WINDOW_UPDATE: it does no flow control
    assert not [f for f in frames if isinstance(f, (SettingsFrame, WindowUpdateFrame))]
    request = (DATA / "exec-stdin.request.http").read_text()
    assert request.startswith("POST /exec/")
    assert "Upgrade: SPDY/3.1" in request and "Connection: Upgrade" in request
    assert [ln.split(": ")[1] for ln in request.splitlines() if ln.startswith("X-Stream-Protocol-Version")] == [
        "v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]


def test_recorded_client_tty_and_ping_frames_decode() -> None:
    tty = frames_of((DATA / "exec-tty.client.bin").read_bytes())
    assert [f.headers["streamtype"] for f in tty if isinstance(f, SynStreamFrame)] == [
        ["error"], ["stdin"], ["stdout"], ["resize"]]
    ping = frames_of((DATA / "exec-ping.client.bin").read_bytes())
    assert PingFrame(1) in ping  # client-go pings every 5 s, odd ids
    assert any(isinstance(f, RstStreamFrame) and f.status == CANCEL for f in ping)


def test_recorded_client_portforward_frames_decode() -> None:
    frames = frames_of((DATA / "portforward.client.bin").read_bytes())
    syns = {(f.headers["requestid"][0], f.headers["streamtype"][0]): f
            for f in frames if isinstance(f, SynStreamFrame)}
    assert set(syns) == {("0", "error"), ("0", "data"), ("1", "error"), ("1", "data")}
    assert all(f.headers["port"] == ["8080"] and len(f.headers) == 3 for f in syns.values())
    # the client half-closes each error stream at once (it never writes to it)
    for rid in "01":
        assert DataFrame(syns[(rid, "error")].stream_id, b"", FLAG_FIN) in frames
        assert DataFrame(syns[(rid, "data")].stream_id, pattern(5)) in frames
    request = (DATA / "portforward.request.http").read_text()
    assert "X-Stream-Protocol-Version: portforward.k8s.io" in request
    assert "conn=1 bytes=5" in (DATA / "portforward.client-result.txt").read_text()


def test_recorded_server_frames_are_what_the_client_accepted() -> None:
    frames = frames_of((DATA / "exec-stdin.server.bin").read_bytes())
    assert isinstance(frames[0], SettingsFrame) and frames[0].get(SETTINGS_INITIAL_WINDOW_SIZE) == 65536
    assert [f.stream_id for f in frames if isinstance(f, SynReplyFrame)] == [1, 3, 5, 7]
    assert DataFrame(5, pattern(11)) in frames and DataFrame(7, b"oops\n") in frames
    status = next(f for f in frames if isinstance(f, DataFrame) and f.stream_id == 1 and f.data)
    assert json.loads(status.data)["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    assert isinstance(frames[-1], GoAwayFrame)
    assert "exit=3" in (DATA / "exec-stdin.client-result.txt").read_text()
    ping = frames_of((DATA / "exec-ping.server.bin").read_bytes())
    assert PingFrame(1) in ping  # the echo


class BytesReader:
    """A reader over fixed bytes, then EOF."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    async def readexactly(self, n: int) -> bytes:
        await asyncio.sleep(0)
        if self.pos + n > len(self.data):
            raise asyncio.IncompleteReadError(self.data[self.pos:], n)
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk


class ListWriter:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.data += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_session_serves_recorded_client_bytes() -> None:
    async def main() -> tuple[list[SpdyStream], list[spdy.Frame]]:
        writer = ListWriter()
        session = SpdySession(BytesReader((DATA / "exec-ping.client.bin").read_bytes()), writer)
        task = asyncio.create_task(session.run())
        streams = []
        while (s := await session.accept()) is not None:
            streams.append(s)
        await task
        return streams, frames_of(bytes(writer.data))

    streams, out = run(main())
    assert [s.headers["streamtype"] for s in streams] == ["error", "stdout", "stderr"]
    assert [s.stream_id for s in streams] == [1, 3, 5]
    assert [f.stream_id for f in out if isinstance(f, SynReplyFrame)] == [1, 3, 5]
    assert PingFrame(1) in out
    assert isinstance(out[-1], GoAwayFrame) and out[-1].last_good_stream_id == 5
    assert streams[0].reset_status == CANCEL  # the client's RST_STREAM


# ---------------------------------------------------------------------------------------------
# sessions over real sockets


async def _pair(**server_kw: Any) -> tuple[SpdySession, SpdySession, list[asyncio.Task]]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    server = SpdySession(ra, wa, server=True, **server_kw)
    client = SpdySession(rb, wb, server=False)
    tasks = [asyncio.create_task(server.run()), asyncio.create_task(client.run())]
    return server, client, tasks


class RawPeer:
    """The other end written by hand: frames in and out, no session logic."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.enc, self.dec = FrameEncoder(), FrameDecoder()
        self.pending: list[spdy.Frame] = []

    def send(self, *frames: spdy.Frame) -> None:
        for f in frames:
            self.writer.write(self.enc.encode(f))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, timeout: float = 5.0) -> spdy.Frame | None:
        """The next frame; None at EOF."""
        while not self.pending:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
            except ConnectionError:
                return None
            if not data:
                return None
            self.pending += self.dec.feed(data)
        return self.pending.pop(0)

    async def recv_until(self, pred: Callable[[spdy.Frame], bool], timeout: float = 5.0) -> list[spdy.Frame]:
        seen = []
        while True:
            f = await self.recv(timeout)
            if f is None:
                raise EOFError(f"EOF before the frame; saw {seen}")
            seen.append(f)
            if pred(f):
                return seen

    async def quiet(self, seconds: float) -> list[spdy.Frame]:
        """Frames that arrive within `seconds`."""
        out = list(self.pending)
        self.pending.clear()
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except asyncio.TimeoutError:
                break
            if not data:
                break
            out += self.dec.feed(data)
        return out


async def _raw(**kw: Any) -> tuple[SpdySession, RawPeer, asyncio.Task]:
    """Our server session against a hand-driven client."""
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    session = SpdySession(ra, wa, server=True, **kw)
    return session, RawPeer(rb, wb), asyncio.create_task(session.run())


async def _read_all(stream: SpdyStream) -> bytes:
    out = bytearray()
    while chunk := await stream.read():
        out += chunk
    return bytes(out)


def test_session_pair_streams_10mib_both_ways() -> None:
    size = 10 << 20
    up, down = pattern(1 << 16) * (size >> 16), bytes(reversed(pattern(1 << 16))) * (size >> 16)

    async def main() -> None:
        server, client, tasks = await _pair()

        async def serve() -> bytes:
            st = await server.accept()
            assert st is not None and st.headers == {"streamtype": "data", "port": "80"}
            got, _ = await asyncio.gather(_read_all(st), st.write(down))
            await st.close()
            return got

        async def dial() -> bytes:
            st = await client.open_stream({"streamType": "data", "port": "80"})
            high = 0

            async def reader() -> bytes:
                nonlocal high
                out = bytearray()
                while chunk := await st.read():
                    high = max(high, st.buffered + len(chunk))
                    out += chunk
                return bytes(out)

            async def writer() -> None:
                await st.write(up)
                await st.close()

            got, _ = await asyncio.gather(reader(), writer())
            assert high <= spdy.DEFAULT_WINDOW  # a flow-controlled peer stays inside our window
            return got

        got_up, got_down = await asyncio.gather(serve(), dial())
        assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
        assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
        assert server.peer_flow_control and client.peer_flow_control
        assert not server.streams and not client.streams
        await client.close()
        await asyncio.gather(*tasks)
        assert server.closed.is_set() and client.closed.is_set()

    run(main(), 60)


def test_writer_waits_for_stream_window_and_resumes_on_window_update() -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        peer.send(SettingsFrame([Setting(SETTINGS_INITIAL_WINDOW_SIZE, 1000)]),
                  SynStreamFrame(1, {"streamtype": ["stdout"]}))
        stream = await session.accept()
        assert stream is not None
        writing = asyncio.create_task(stream.write(b"x" * 5000))
        got = await peer.quiet(0.3)
        sent = sum(len(f.data) for f in got if isinstance(f, DataFrame))
        assert sent == 1000 and not writing.done()  # stopped at the window
        peer.send(WindowUpdateFrame(1, 1500))
        got = await peer.quiet(0.3)
        assert sum(len(f.data) for f in got if isinstance(f, DataFrame)) == 1500 and not writing.done()
        peer.send(WindowUpdateFrame(1, 10000))
        await asyncio.wait_for(writing, 5)
        got = await peer.quiet(0.2)
        assert sum(len(f.data) for f in got if isinstance(f, DataFrame)) == 2500
        await session.close()
        await task

    run(main())


def test_writer_waits_for_session_window() -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        peer.send(SettingsFrame([Setting(SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)]),
                  SynStreamFrame(1, {}))
        stream = await session.accept()
        assert stream is not None
        writing = asyncio.create_task(stream.write(b"y" * 100_000))
        got = await peer.quiet(0.3)
        assert sum(len(f.data) for f in got if isinstance(f, DataFrame)) == spdy.DEFAULT_WINDOW
        peer.send(WindowUpdateFrame(0, 1 << 20))  # the session window
        await asyncio.wait_for(writing, 5)
        await session.close()
        await task

    run(main())


def test_settings_initial_window_change_applies_to_open_streams() -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        peer.send(SettingsFrame([Setting(SETTINGS_INITIAL_WINDOW_SIZE, 100)]), SynStreamFrame(1, {}))
        stream = await session.accept()
        assert stream is not None
        writing = asyncio.create_task(stream.write(b"z" * 300))
        assert sum(len(f.data) for f in await peer.quiet(0.2) if isinstance(f, DataFrame)) == 100
        peer.send(SettingsFrame([Setting(SETTINGS_INITIAL_WINDOW_SIZE, 300)]))  # +200 for open streams
        await asyncio.wait_for(writing, 5)
        assert sum(len(f.data) for f in await peer.quiet(0.2) if isinstance(f, DataFrame)) == 200
        await session.close()
        await task

    run(main())


def test_receiver_sends_window_update_as_the_application_reads() -> None:
    async def main() -> None:
        session, peer, task = await _raw(session_window=spdy.DEFAULT_WINDOW)
        peer.send(SynStreamFrame(1, {}))
        stream = await session.accept()
        assert stream is not None
        peer.send(*[DataFrame(1, b"a" * 8192) for _ in range(6)])  # 48 KiB of our 64 KiB
        await asyncio.sleep(0.2)
        got = await peer.quiet(0.1)
        assert not [f for f in got if isinstance(f, WindowUpdateFrame) and f.delta < 900000]
        n = 0
        while n < 40000:
            n += len(await stream.read())
        updates = [f for f in await peer.quiet(0.2) if isinstance(f, WindowUpdateFrame)]
        assert WindowUpdateFrame(1, 32768) in updates  # half the stream window consumed
        assert WindowUpdateFrame(0, 32768) in updates  # and of the session window
        await session.close()
        await task

    run(main())


def test_peer_without_flow_control_is_never_blocked() -> None:
    """spdystream sends no WINDOW_UPDATE: our writes must not stop after 64 KiB, and its DATA past
    the window we granted is read (slowed by back-pressure), never refused."""

    async def main() -> None:
        session, peer, task = await _raw()
        peer.send(SynStreamFrame(1, {}))
        stream = await session.accept()
        assert stream is not None
        writing = asyncio.create_task(stream.write(b"w" * (1 << 20)))
        received = 0
        while received < (1 << 20):
            f = await peer.recv()
            assert f is not None
            if isinstance(f, DataFrame):
                received += len(f.data)
        await asyncio.wait_for(writing, 5)
        assert not session.peer_flow_control
        payload = pattern(16384)
        sender = asyncio.create_task(_send_many(peer, 1, payload, 64))  # 1 MiB, windows ignored
        await asyncio.sleep(0.3)
        assert stream.buffered <= spdy.DEFAULT_WINDOW + len(payload)  # bounded while unread
        got_bytes = await _read_n(stream, 64 * len(payload))
        assert got_bytes == payload * 64
        await sender
        await session.close()
        await task

    run(main())


async def _send_many(peer: RawPeer, sid: int, payload: bytes, times: int) -> None:
    for _ in range(times):
        peer.send(DataFrame(sid, payload))
        await peer.writer.drain()


async def _read_n(stream: SpdyStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = await stream.read()
        assert chunk
        out += chunk
    return bytes(out)


def test_unread_stream_holds_the_connection_not_memory() -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        peer.send(SynStreamFrame(1, {}), SynStreamFrame(3, {}))
        first, second = await session.accept(), await session.accept()
        assert first is not None and second is not None
        sender = asyncio.create_task(_send_many(peer, 1, b"q" * 16384, 400))  # 6.25 MiB
        await asyncio.sleep(0.5)
        assert first.buffered <= spdy.DEFAULT_WINDOW + 16384
        assert not sender.done()  # the socket pushed back
        first.reset()  # the application gives up on it: the loop goes on
        await asyncio.wait_for(sender, 10)
        peer.send(DataFrame(3, b"after", FLAG_FIN))
        assert await asyncio.wait_for(_read_all(second), 5) == b"after"
        frames = await peer.recv_until(lambda f: isinstance(f, RstStreamFrame))
        assert frames[-1] == RstStreamFrame(1, CANCEL)
        await session.close()
        await task

    run(main())


def test_rst_stream_from_the_peer() -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        peer.send(SynStreamFrame(1, {}), DataFrame(1, b"unread"))
        stream = await session.accept()
        assert stream is not None
        await asyncio.sleep(0.1)
        peer.send(RstStreamFrame(1, CANCEL))
        for _ in range(100):
            if stream.reset_status is not None:
                break
            await asyncio.sleep(0.02)
        assert await asyncio.wait_for(stream.read(), 5) == b""  # the unread data is dropped
        assert stream.remote_closed and stream.reset_status == CANCEL
        with pytest.raises(StreamReset) as err:
            await stream.write(b"late")
        assert err.value.status == CANCEL
        assert 1 not in session.streams
        await stream.close()  # idempotent, sends nothing
        frames = await peer.quiet(0.2)
        assert not [f for f in frames if isinstance(f, DataFrame)]
        await session.close()
        await task

    run(main())


def test_reset_by_the_application() -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        peer.send(SynStreamFrame(1, {}))
        stream = await session.accept()
        assert stream is not None
        stream.reset(REFUSED_STREAM)
        stream.reset()  # once
        frames = await peer.recv_until(lambda f: isinstance(f, RstStreamFrame))
        assert frames[-1] == RstStreamFrame(1, REFUSED_STREAM)
        assert await stream.read() == b""
        with pytest.raises(StreamReset):
            await stream.write(b"x")
        peer.send(DataFrame(1, b"ignored"))  # data in flight after the reset: dropped quietly
        peer.send(PingFrame(1))
        frames = await peer.recv_until(lambda f: isinstance(f, PingFrame))
        assert not [f for f in frames if isinstance(f, RstStreamFrame)]
        await session.close()
        await task

    run(main())


def test_half_close_both_ways() -> None:
    async def main() -> None:
        server, client, tasks = await _pair()
        cs = await client.open_stream({"streamtype": "stdin"})
        ss = await server.accept()
        assert ss is not None
        await cs.write(b"in")
        await cs.close()
        await cs.close()  # idempotent
        assert await _read_all(ss) == b"in" and ss.remote_closed
        await ss.write(b"out after the peer's FIN")
        await ss.close()
        assert await _read_all(cs) == b"out after the peer's FIN"
        assert not server.streams and not client.streams
        with pytest.raises(StreamReset):
            await cs.write(b"closed")
        await client.close()
        await asyncio.gather(*tasks)

    run(main())


def test_syn_stream_with_fin_and_unidirectional() -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        peer.send(SynStreamFrame(1, {"streamtype": ["error"]}, FLAG_FIN),
                  SynStreamFrame(3, {"x": ["y"]}, FLAG_UNIDIRECTIONAL), DataFrame(3, b"one way", FLAG_FIN))
        fin = await session.accept()
        uni = await session.accept()
        assert fin is not None and uni is not None
        assert fin.remote_closed and await fin.read() == b""
        await fin.write(b"still writable")
        assert await uni.read() == b"one way"
        with pytest.raises(StreamReset):
            await uni.write(b"no")
        frames = await peer.recv_until(lambda f: isinstance(f, DataFrame))
        assert [f.stream_id for f in frames if isinstance(f, SynReplyFrame)] == [1]  # none for 3
        await session.close()
        await task

    run(main())


def test_goaway_from_the_peer() -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        peer.send(SynStreamFrame(1, {}), GoAwayFrame(0, GOAWAY_OK))
        stream = await session.accept()
        assert stream is not None
        assert await session.accept() is None  # no more streams
        assert not session.closed.is_set()  # the open stream finishes first
        peer.send(DataFrame(1, b"last", FLAG_FIN))
        assert await _read_all(stream) == b"last"
        await stream.write(b"reply")
        await stream.close()
        await asyncio.wait_for(session.closed.wait(), 5)
        await asyncio.wait_for(task, 5)
        frames = await peer.recv_until(lambda f: isinstance(f, GoAwayFrame))
        assert DataFrame(1, b"reply") in frames and frames[-1] == GoAwayFrame(1, GOAWAY_OK)

    run(main())


def test_goaway_refuses_our_unprocessed_streams() -> None:
    async def main() -> None:
        server, client, tasks = await _pair()
        st = await client.open_stream({})
        assert await server.accept() is not None
        server._send_frame(GoAwayFrame(0, GOAWAY_OK))  # as if stream 1 was never processed
        await server._drain()
        assert await asyncio.wait_for(st.read(), 5) == b""
        assert st.reset_status == REFUSED_STREAM
        with pytest.raises(StreamReset):
            await client.open_stream({})
        await server.close()
        await asyncio.gather(*tasks)

    run(main())


def test_close_sends_goaway_and_ends_everything() -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        peer.send(SynStreamFrame(1, {}), SynStreamFrame(3, {}), DataFrame(3, b"kept"))
        a, b = await session.accept(), await session.accept()
        assert a is not None and b is not None
        await asyncio.sleep(0.1)
        reading = asyncio.create_task(a.read())
        await session.close()
        await session.close()
        await asyncio.wait_for(task, 5)
        assert await asyncio.wait_for(reading, 5) == b""
        assert await b.read() == b"kept" and await b.read() == b""  # what arrived is still readable
        with pytest.raises(StreamReset):
            await a.write(b"x")
        assert await session.accept() is None
        frames = await peer.recv_until(lambda f: isinstance(f, GoAwayFrame))
        assert frames[-1] == GoAwayFrame(3, GOAWAY_OK)
        assert await peer.recv() is None  # and the connection is closed

    run(main())


def test_ping_is_echoed_and_timed() -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        peer.send(PingFrame(7))
        frames = await peer.recv_until(lambda f: isinstance(f, PingFrame))
        assert frames[-1] == PingFrame(7)
        pinging = asyncio.create_task(session.ping())  # ours: even ids from a server
        frames = await peer.recv_until(lambda f: isinstance(f, PingFrame))
        assert frames[-1] == PingFrame(2)
        peer.send(frames[-1])
        assert 0 <= await asyncio.wait_for(pinging, 5) < 5
        await session.close()
        await task
        server, client, tasks = await _pair()
        assert await client.ping() >= 0 and await server.ping() >= 0
        await client.close()
        await asyncio.gather(*tasks)

    run(main())


def test_ping_flood_from_a_peer_that_does_not_read_is_bounded() -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        count = 200_000  # 2.4 MB of PINGs, 2.4 MB of echoes nobody reads
        peer.send_raw(FrameEncoder().encode(PingFrame(1)) * count)
        await asyncio.sleep(1.0)
        transport = session._writer.transport  # type: ignore[attr-defined]
        assert transport.get_write_buffer_size() <= 384 * 1024
        assert session.frames_in < count  # the loop stopped reading: the socket pushes back
        echoes = 0
        while echoes < count:  # once read, every PING is answered
            f = await peer.recv()
            assert f is not None
            echoes += isinstance(f, PingFrame)
        await session.close()
        await task

    run(main(), 60)


@pytest.mark.parametrize("bad", ["version 2", "not zlib", "rst length", "data stream 0", "inflates too far"])
def test_malformed_input_closes_the_session_with_goaway(bad: str) -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        peer.send(SynStreamFrame(1, {}))
        stream = await session.accept()
        assert stream is not None
        peer.send_raw(MALFORMED[bad])
        await asyncio.wait_for(task, 5)  # returns: nothing escapes run()
        frames = await peer.recv_until(lambda f: isinstance(f, GoAwayFrame))
        assert frames[-1] == GoAwayFrame(1, GOAWAY_PROTOCOL_ERROR)
        assert await peer.recv() is None
        assert session.closed.is_set() and await stream.read() == b""

    run(main())


@pytest.mark.parametrize("sid", [2, 1])
def test_bad_stream_ids_are_a_protocol_error(sid: int) -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        peer.send(SynStreamFrame(1, {}))
        assert await session.accept() is not None
        peer.send(SynStreamFrame(sid, {}))  # even (ours) / not increasing
        await asyncio.wait_for(task, 5)
        frames = await peer.recv_until(lambda f: isinstance(f, GoAwayFrame))
        assert frames[-1].status == GOAWAY_PROTOCOL_ERROR  # type: ignore[union-attr]

    run(main())


def test_data_for_a_stream_never_opened_is_refused() -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        peer.send(DataFrame(9, b"?"))
        frames = await peer.recv_until(lambda f: isinstance(f, RstStreamFrame))
        assert frames[-1] == RstStreamFrame(9, spdy.INVALID_STREAM)
        await session.close()
        await task

    run(main())


def test_too_many_streams_are_refused() -> None:
    async def main() -> None:
        session, peer, task = await _raw(max_concurrent_streams=2)
        peer.send(SynStreamFrame(1, {}), SynStreamFrame(3, {}), SynStreamFrame(5, {}))
        frames = await peer.recv_until(lambda f: isinstance(f, RstStreamFrame))
        assert frames[-1] == RstStreamFrame(5, REFUSED_STREAM)
        assert [f.stream_id for f in frames if isinstance(f, SynReplyFrame)] == [1, 3]
        await session.close()
        await task

    run(main())


def test_idle_timeout_closes_the_session() -> None:
    async def main() -> None:
        session, peer, task = await _raw(idle_timeout=0.4)
        loop = asyncio.get_running_loop()
        for _ in range(6):  # traffic keeps it open past the timeout
            peer.send(PingFrame(1))
            last = loop.time()
            await asyncio.sleep(0.15)
        assert not session.closed.is_set()
        await asyncio.wait_for(session.closed.wait(), 3)
        assert loop.time() - last >= 0.4 - 0.05
        await asyncio.wait_for(task, 5)
        frames = await peer.recv_until(lambda f: isinstance(f, GoAwayFrame))
        assert frames[-1].status == GOAWAY_OK  # type: ignore[union-attr]

    run(main())


def test_eof_mid_frame_ends_the_session_quietly() -> None:
    async def main() -> None:
        session, peer, task = await _raw()
        peer.send_raw(FrameEncoder().encode(PingFrame(1))[:5])
        peer.writer.close()
        await asyncio.wait_for(task, 5)
        assert session.closed.is_set()

    run(main())


# ---------------------------------------------------------------------------------------------
# the real client, live: contrib/tools/spdy-recorder (client-go remotecommand over spdystream)


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("go") is None and not Path("/usr/local/go/bin/go").exists():
        pytest.skip("no Go toolchain to build the real client")
    yield build_client(tmp_path_factory.mktemp("spdy-client"))


def _exec(binary: Path, server: ExecServer, args: list[str], **url: Any) -> Any:
    async def main() -> Any:
        await server.start()
        try:
            return await run_client(binary, server.url(**url), *args)
        finally:
            await server.stop()

    return run(main(), 120)


def test_real_client_exec_output_and_exit_code(go_client: Path) -> None:
    server = ExecServer(exit_code=3, stderr=b"oops\n")
    result = _exec(go_client, server, ["-stdin-bytes", "11"], stdin=True)
    assert result.returncode == 3, result.raw
    assert result.stdout_sha256 == hashlib.sha256(pattern(11)).hexdigest()
    assert result.stderr == "oops\n"
    ex = server.exchanges[0]
    assert not ex.error and [s["streamtype"] for s in ex.streams] == ["error", "stdin", "stdout", "stderr"]


def test_real_client_10mib_each_way_without_window_updates(go_client: Path) -> None:
    """10 MiB of stdin echoed as stdout: spdystream never grants window, and neither side stalls."""
    size = 10 << 20
    server = ExecServer()
    result = _exec(go_client, server, ["-stdin-bytes", str(size)], stdin=True)
    assert result.returncode == 0, result.raw
    ex = server.exchanges[0]
    want = hashlib.sha256(pattern(size)).hexdigest()
    assert ex.stdin_bytes == size and ex.stdin_sha256 == want
    assert result.stdout_bytes == size and result.stdout_sha256 == want
    client_frames = frames_of(ex.client_bytes)
    assert not [f for f in client_frames if isinstance(f, (WindowUpdateFrame, SettingsFrame))]
    stdin_frames = [f for f in client_frames if isinstance(f, DataFrame) and f.stream_id == 3]
    assert sum(len(f.data) for f in stdin_frames) == size  # far past the 64 KiB we granted
    assert any(isinstance(f, WindowUpdateFrame) for f in frames_of(ex.server_bytes))


def test_real_client_tty_streams(go_client: Path) -> None:
    server = ExecServer()
    result = _exec(go_client, server, ["-stdin-bytes", "3", "-tty"], stdin=True, tty=True)
    assert result.returncode == 0, result.raw
    assert [s["streamtype"] for s in server.exchanges[0].streams] == ["error", "stdin", "stdout", "resize"]
    assert result.stdout_sha256 == hashlib.sha256(pattern(3)).hexdigest()


def test_real_client_portforward_10_connections(go_client: Path) -> None:
    """crictl port-forward's client: 10 connections at once, 1 MiB each way on each."""
    server = ForwardServer()

    async def main() -> Any:
        await server.start()
        try:
            return await run_client(go_client, server.url(), "-portforward", "8080",
                                    "-send", str(1 << 20), "-conns", "10")
        finally:
            await server.stop()

    result = run(main(), 120)
    assert result.returncode == 0, result.raw
    want = hashlib.sha256(pattern(1 << 20)).hexdigest()
    assert [c["sha256"] for c in result.conns] == [want] * 10
    ex = server.exchanges[0]
    assert not ex.error and ex.stdin_bytes == 10 << 20
    pairs = {(s["requestid"], s["streamtype"]) for s in ex.streams}
    assert pairs == {(str(i), kind) for i in range(10) for kind in ("error", "data")}


def test_real_client_ping_is_answered(go_client: Path) -> None:
    server = ExecServer(delay=5.5)  # client-go pings every 5 s
    result = _exec(go_client, server, [], stdin=False)
    assert result.returncode == 0, result.raw
    ex = server.exchanges[0]
    assert PingFrame(1) in frames_of(ex.client_bytes)
    assert PingFrame(1) in frames_of(ex.server_bytes)
