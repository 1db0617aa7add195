"""remotecommand: the k8s exec/attach protocols (SPDY v1..v5, WebSocket channel protocols) over
in-memory transports (tests/stream_fakes.py), checked against what client-go expects on the wire."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, Awaitable, Callable

import pytest

from pycrio.streaming.remotecommand import ResizeDecoder, serve_remotecommand
from pycrio.streaming.session import ClientGone, ExecOutcome, SessionIO, TerminalSize
from tests.stream_fakes import (FakeSpdySession, FakeWebSocket, Request, SpdyTransport, WebSocketTransport,
                                read_all, spdy_pair)

EXIT3_MESSAGE = ("command terminated with non-zero exit code: "
                 "error executing command [sh -c exit 3], exit code 3")
EXIT3_JSON = ('{"status":"Failure","message":"' + EXIT3_MESSAGE + '","reason":"NonZeroExitCode",'
              '"details":{"causes":[{"reason":"ExitCode","message":"3"}]}}')
ERROR_MESSAGE = "Internal error occurred: error executing command in container: boom"
ERROR_JSON = '{"status":"Failure","message":"' + ERROR_MESSAGE + '","reason":"InternalError","code":500}'
SUCCESS_JSON = '{"status":"Success"}'

Run = Callable[[SessionIO], Awaitable[ExecOutcome]]


def arun(coro: Awaitable[Any], timeout: float = 10.0) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(main())


def outputs_then(outcome: ExecOutcome | Exception) -> Run:
    async def run(io: SessionIO) -> ExecOutcome:
        await io.write_stdout(b"out\n")
        await io.write_stderr(b"err\n")
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    return run


async def cat(io: SessionIO) -> ExecOutcome:
    """Copies stdin to stdout until EOF, as `cat` does."""
    while data := await io.read_stdin():
        await io.write_stdout(data)
    return ExecOutcome(exit_code=0)


def open_client_streams(session: FakeSpdySession, *, stdin: bool, stdout: bool = True,
                        stderr: bool = True, resize: bool = False,
                        window: int | None = None) -> dict[str, Any]:
    """The streams client-go opens, in its order: error, stdin, stdout, stderr (no tty), resize."""
    streams = {"error": session.client_open({"streamType": "error"})}
    if stdin:
        streams["stdin"] = session.client_open({"streamType": "stdin"})
    if stdout:
        streams["stdout"] = session.client_open({"streamType": "stdout"}, window=window)
    if stderr:
        streams["stderr"] = session.client_open({"streamType": "stderr"}, window=window)
    if resize:
        streams["resize"] = session.client_open({"streamType": "resize"})
    return streams


OUTCOMES = {
    "exit0": ExecOutcome(exit_code=0),
    "exit3": ExecOutcome(exit_code=3),
    "run_error": RuntimeError("boom"),
}
EXPECTED_TEXT = {"exit0": b"", "exit3": EXIT3_MESSAGE.encode(), "run_error": ERROR_MESSAGE.encode()}
EXPECTED_JSON = {"exit0": SUCCESS_JSON.encode(), "exit3": EXIT3_JSON.encode(), "run_error": ERROR_JSON.encode()}


@pytest.mark.parametrize("outcome", list(OUTCOMES))
@pytest.mark.parametrize("protocol", ["channel.k8s.io", "v2.channel.k8s.io", "v3.channel.k8s.io",
                                      "v4.channel.k8s.io", "v5.channel.k8s.io", ""])
def test_spdy_error_stream_per_version(protocol: str, outcome: str) -> None:
    async def main() -> None:
        session = FakeSpdySession()
        streams = open_client_streams(session, stdin=False)
        result = await serve_remotecommand(Request(), SpdyTransport(session, protocol),
                                           outputs_then(OUTCOMES[outcome]))
        assert await streams["stdout"].client_read_all() == b"out\n"
        assert await streams["stderr"].client_read_all() == b"err\n"
        status = await streams["error"].client_read_all()
        json_status = protocol.startswith(("v4", "v5"))
        assert status == (EXPECTED_JSON if json_status else EXPECTED_TEXT)[outcome]
        if json_status:
            json.loads(status)  # as client-go's errorDecoderV4 parses it
        for s in streams.values():
            assert s.local_closed, "every stream is half-closed so the client's reads end"
        assert session.close_calls == 1
        if outcome == "run_error":
            assert result.error == "boom"
        else:
            assert result.exit_code == OUTCOMES[outcome].exit_code
    arun(main())


def test_spdy_attach_statuses() -> None:
    async def main(outcome: ExecOutcome) -> bytes:
        session = FakeSpdySession()
        streams = open_client_streams(session, stdin=False)
        await serve_remotecommand(Request(kind="attach"), SpdyTransport(session, "v4.channel.k8s.io"),
                                  outputs_then(outcome))
        return await streams["error"].client_read_all()
    assert arun(main(ExecOutcome(error="no attach socket"))) == (
        b'{"status":"Failure","message":"Internal error occurred: error attaching to container: '
        b'no attach socket","reason":"InternalError","code":500}')
    # attach never reports an exit code (k8s ServeAttach): Success whatever the code
    assert arun(main(ExecOutcome(exit_code=3))) == SUCCESS_JSON.encode()


WS_PROTOCOLS = ["", "channel.k8s.io", "base64.channel.k8s.io", "v4.channel.k8s.io",
                "v4.base64.channel.k8s.io", "v5.channel.k8s.io"]


def ws_decode(message: bytes | str, protocol: str) -> tuple[int, bytes]:
    if "base64" in protocol:
        assert isinstance(message, str), "base64 protocols send text messages"
        return ord(message[0]) - ord("0"), base64.b64decode(message[1:])
    assert isinstance(message, bytes), "binary protocols send binary messages"
    return message[0], message[1:]


@pytest.mark.parametrize("outcome", list(OUTCOMES))
@pytest.mark.parametrize("protocol", WS_PROTOCOLS)
def test_websocket_channels_and_status(protocol: str, outcome: str) -> None:
    async def main() -> None:
        ws = FakeWebSocket()
        await serve_remotecommand(Request(), WebSocketTransport(ws, protocol), outputs_then(OUTCOMES[outcome]))
        frames = [ws_decode(m, protocol) for m in ws.sent]
        expected = [(1, b""), (1, b"out\n"), (2, b"err\n")]
        status = (EXPECTED_JSON if protocol.startswith(("v4", "v5")) else EXPECTED_TEXT)[outcome]
        if status:
            expected.append((3, status))
        assert frames == expected
        assert ws.closed and ws.close_code == 1000
    arun(main())


def test_websocket_first_message_without_stdout() -> None:
    """k8s opens with an empty message on stdout, else stderr, else the error channel."""
    async def main(request: Request) -> bytes | str:
        ws = FakeWebSocket()
        await serve_remotecommand(request, WebSocketTransport(ws, "v5.channel.k8s.io"),
                                  lambda io: asyncio.sleep(0, ExecOutcome(exit_code=0)))
        return ws.sent[0]
    assert arun(main(Request(stdout=False))) == b"\x02"
    assert arun(main(Request(stdout=False, stderr=False, stdin=True))) == b"\x03"


def test_spdy_stdin_half_close_ends_cat() -> None:
    async def main() -> None:
        session = FakeSpdySession()
        streams = open_client_streams(session, stdin=True)
        served = asyncio.ensure_future(serve_remotecommand(
            Request(stdin=True), SpdyTransport(session, "v4.channel.k8s.io"), cat))
        await streams["stdin"].client_send(b"hello ")
        await streams["stdin"].client_send(b"world\n")
        await streams["stdin"].client_fin()
        assert (await served).exit_code == 0
        assert await streams["stdout"].client_read_all() == b"hello world\n"
        assert await streams["error"].client_read_all() == SUCCESS_JSON.encode()
    arun(main())


def test_websocket_v5_close_signal_ends_stdin() -> None:
    async def main() -> None:
        ws = FakeWebSocket()
        served = asyncio.ensure_future(serve_remotecommand(
            Request(stdin=True), WebSocketTransport(ws, "v5.channel.k8s.io"), cat))
        ws.client_send(b"\x00hi\n")
        ws.client_send(b"\xff\x00")  # client-go's stream.Close() on stdin
        ws.client_send(b"\x00ignored after close")
        assert (await served).exit_code == 0
        assert ws.sent == [b"\x01", b"\x01hi\n", b"\x03" + SUCCESS_JSON.encode()]
    arun(main())


def test_websocket_v4_close_signal_and_connection_end() -> None:
    """client-go sends [255, 0] at stdin EOF whatever the version; honoured in v4 too (k8s drops
    it there and the command never sees EOF). Without it stdin ends with the connection."""
    async def main(send_close: bool) -> None:
        ws = FakeWebSocket()
        seen: list[SessionIO] = []

        async def run(io: SessionIO) -> ExecOutcome:
            seen.append(io)
            return await cat(io)
        served = asyncio.ensure_future(serve_remotecommand(
            Request(stdin=True), WebSocketTransport(ws, "v4.channel.k8s.io"), run))
        ws.client_send(b"\x00a")
        ws.client_send(b"\xff\x00\x00")  # not a close signal: dropped (v4 does not end the session)
        await asyncio.sleep(0.05)
        assert not served.done()
        if send_close:
            ws.client_send(b"\xff\x00")
            assert (await served).exit_code == 0
            assert ws.sent[-1] == b"\x03" + SUCCESS_JSON.encode()
        else:
            await ws.client_close()
            assert (await served).exit_code == 0
            assert seen[0].client_gone.is_set()
    arun(main(True))
    arun(main(False))


def test_websocket_base64_stdin() -> None:
    async def main() -> None:
        ws = FakeWebSocket()
        served = asyncio.ensure_future(serve_remotecommand(
            Request(stdin=True), WebSocketTransport(ws, "v4.base64.channel.k8s.io"), cat))
        ws.client_send("0" + base64.b64encode(b"typed\n").decode())
        ws.client_send("0!!notbase64")  # dropped with a warning
        await asyncio.sleep(0.05)
        await ws.client_close()
        await served
        assert ws.sent[:2] == ["1", "1" + base64.b64encode(b"typed\n").decode()]
    arun(main())


def test_websocket_bad_close_signal_ends_session() -> None:
    async def main() -> None:
        ws = FakeWebSocket()
        served = asyncio.ensure_future(serve_remotecommand(
            Request(stdin=True), WebSocketTransport(ws, "v5.channel.k8s.io"), cat))
        ws.client_send(b"\xff\x00\x01")  # k8s: "single channel byte should follow" -> ends the reader
        await served
        assert ws.closed
    arun(main())


def collect_resizes(count: int) -> tuple[Run, list[TerminalSize]]:
    sizes: list[TerminalSize] = []

    async def run(io: SessionIO) -> ExecOutcome:
        while len(sizes) < count:
            sizes.append(await io.resizes.get())
        return ExecOutcome(exit_code=0)
    return run, sizes


def test_spdy_resize_stream_v3() -> None:
    async def main() -> None:
        session = FakeSpdySession()
        streams = open_client_streams(session, stdin=False, stderr=False, resize=True)
        run, sizes = collect_resizes(3)
        served = asyncio.ensure_future(serve_remotecommand(
            Request(tty=True, stderr=True), SpdyTransport(session, "v3.channel.k8s.io"), run))
        # client-go's json.Encoder: one object and a newline per Write; split anywhere on the wire
        await streams["resize"].client_send(b'{"Width":80,"Height":24}\n{"Width":1')
        await streams["resize"].client_send(b'00,"Height":50}\n')
        await streams["resize"].client_send(b'{"width":7,"height":9,"extra":1}')
        assert (await served).exit_code == 0
        assert sizes == [TerminalSize(80, 24), TerminalSize(100, 50), TerminalSize(7, 9)]
    arun(main())


def test_spdy_v2_has_no_resize_stream() -> None:
    """v2 expects error+stdout only with a tty: a resize stream is refused, not waited for."""
    async def main() -> None:
        session = FakeSpdySession()
        streams = open_client_streams(session, stdin=False, stderr=False, resize=True)
        async def run(io: SessionIO) -> ExecOutcome:
            await asyncio.sleep(0.05)  # the process runs while the late stream arrives
            return await outputs_then(ExecOutcome(exit_code=0))(io)
        await serve_remotecommand(Request(tty=True, stderr=False), SpdyTransport(session, "v2.channel.k8s.io"), run)
        assert streams["resize"].reset_status == 3
        # with a tty stderr goes where stdout goes
        assert await streams["stdout"].client_read_all() == b"out\nerr\n"
    arun(main())


def test_websocket_resize_channel() -> None:
    async def main() -> None:
        ws = FakeWebSocket()
        run, sizes = collect_resizes(2)
        served = asyncio.ensure_future(serve_remotecommand(
            Request(tty=True, stdin=True, stderr=False), WebSocketTransport(ws, "v5.channel.k8s.io"), run))
        ws.client_send(b'\x04{"Width":120,"Height":40}\n')
        ws.client_send(b'\x04{"Width":121,"Height":41}\n')
        await served
        assert sizes == [TerminalSize(120, 40), TerminalSize(121, 41)]
    arun(main())


def test_resize_decoder_stops_at_bad_value() -> None:
    d = ResizeDecoder()
    assert list(d.feed(b'{"Width":1,"Height":2}')) == [TerminalSize(1, 2)]
    assert list(d.feed(b'{"Width":-1,"Height":2}')) == []  # not a uint16: Go's decoder fails
    assert d.failed
    assert list(d.feed(b'{"Width":3,"Height":4}')) == []  # k8s stops handling resizes
    d = ResizeDecoder()
    assert list(d.feed(b"not json")) == [] and d.failed


def test_spdy_stream_wait_timeout() -> None:
    async def main() -> None:
        session = FakeSpdySession()
        session.client_open({"streamType": "error"})  # stdout and stderr never come
        ran = []

        async def run(io: SessionIO) -> ExecOutcome:
            ran.append(io)
            return ExecOutcome(exit_code=0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await serve_remotecommand(Request(), SpdyTransport(session, "v4.channel.k8s.io"), run,
                                           stream_creation_timeout=0.3)
        assert 0.25 < loop.time() - start < 2
        assert result.error == "timed out waiting for client to create streams"
        assert not ran and session.close_calls == 1
    arun(main())


def test_spdy_client_gone_before_streams() -> None:
    async def main() -> None:
        session = FakeSpdySession()
        session.client_open({"streamType": "error"})
        served = asyncio.ensure_future(serve_remotecommand(Request(), SpdyTransport(session, "v4.channel.k8s.io"),
                                                           outputs_then(ExecOutcome(exit_code=0))))
        await asyncio.sleep(0.05)
        await session.client_disconnect()
        assert "before creating its streams" in (await served).error
    arun(main())


def endless_output(log: list[str]) -> Run:
    async def run(io: SessionIO) -> ExecOutcome:
        try:
            while True:
                await io.write_stdout(b"x" * 1000)
        except ClientGone:
            log.append("gone")
            assert io.client_gone.is_set()
            return ExecOutcome(exit_code=137)
    return run


def test_spdy_client_gone_mid_output_and_backpressure() -> None:
    async def main() -> None:
        session = FakeSpdySession()
        streams = open_client_streams(session, stdin=False, window=4000)
        events: list[str] = []
        served = asyncio.ensure_future(serve_remotecommand(
            Request(), SpdyTransport(session, "v4.channel.k8s.io"), endless_output(events)))
        await asyncio.sleep(0.1)
        # back-pressure: the writer waits on the unread window instead of buffering without end
        assert len(streams["stdout"].writes) <= 5
        await streams["stdout"].client_read()
        await asyncio.sleep(0.05)
        assert len(streams["stdout"].writes) <= 6
        await session.client_disconnect()
        result = await served
        assert events == ["gone"] and result.exit_code == 137
        assert streams["error"].writes == [], "no status is written to a client that is gone"
    arun(main())


def test_websocket_client_gone_mid_output() -> None:
    async def main() -> None:
        ws = FakeWebSocket(window=3)
        events: list[str] = []
        served = asyncio.ensure_future(serve_remotecommand(
            Request(), WebSocketTransport(ws, "v5.channel.k8s.io"), endless_output(events)))
        await asyncio.sleep(0.1)
        assert len(ws.sent) == 3  # the window of unread messages, then send waits
        await ws.client_close()
        assert (await served).exit_code == 137
        assert events == ["gone"]
    arun(main())


def test_client_gone_set_for_stdin_reader() -> None:
    """A runtime blocked in read_stdin sees the client leave (b"" and client_gone)."""
    async def main() -> None:
        session = FakeSpdySession()
        open_client_streams(session, stdin=True)
        seen: list[bool] = []

        async def run(io: SessionIO) -> ExecOutcome:
            assert await io.read_stdin() == b""
            seen.append(io.client_gone.is_set())
            return ExecOutcome(exit_code=0)
        served = asyncio.ensure_future(serve_remotecommand(
            Request(stdin=True), SpdyTransport(session, "v4.channel.k8s.io"), run))
        await asyncio.sleep(0.05)
        await session.client_disconnect()
        await served
        assert seen == [True]
    arun(main())


def test_spdy_extra_streams_refused_and_v1_stdin_closed() -> None:
    async def main() -> None:
        session = FakeSpdySession()
        streams = open_client_streams(session, stdin=True)
        bogus = session.client_open({"streamType": "bogus"})

        async def run(io: SessionIO) -> ExecOutcome:
            late = session.client_open({"streamType": "stdout"})
            await asyncio.sleep(0.05)
            assert late.reset_status == 3
            assert streams["stdin"].local_closed  # k8s v1 closes its half of stdin at once
            return ExecOutcome(exit_code=0)
        await serve_remotecommand(Request(stdin=True), SpdyTransport(session, "channel.k8s.io"), run)
        assert bogus.reset_status == 3
    arun(main())


@pytest.mark.parametrize("protocol", ["channel.k8s.io", "v2.channel.k8s.io", "v3.channel.k8s.io",
                                      "v4.channel.k8s.io", "v5.channel.k8s.io"])
def test_real_spdy_session(protocol: str) -> None:
    """The whole exchange over a real SpdySession pair, the client side doing what client-go does:
    streams error, stdin, stdout, stderr (+ resize from v3 with a tty), stdin FIN, reads to EOF."""
    async def main() -> None:
        async with spdy_pair() as (server, client):
            version = 1 if protocol == "channel.k8s.io" else int(protocol[1])
            tty = version >= 3
            sizes: list[TerminalSize] = []

            async def run(io: SessionIO) -> ExecOutcome:
                if tty:
                    sizes.append(await io.resizes.get())
                data = b""
                while chunk := await io.read_stdin():
                    data += chunk
                await io.write_stdout(data.upper())
                await io.write_stderr(b"to stderr")
                return ExecOutcome(exit_code=3)
            request = Request(stdin=True, tty=tty)
            served = asyncio.ensure_future(serve_remotecommand(request, SpdyTransport(server, protocol), run))
            streams = {"error": await client.open_stream({"streamType": "error"}),
                       "stdin": await client.open_stream({"streamType": "stdin"}),
                       "stdout": await client.open_stream({"streamType": "stdout"})}
            if not tty:
                streams["stderr"] = await client.open_stream({"streamType": "stderr"})
            else:
                streams["resize"] = await client.open_stream({"streamType": "resize"})
                await streams["resize"].write(b'{"Width":132,"Height":43}\n')
            await streams["stdin"].write(b"hello ")
            await streams["stdin"].write(b"spdy")
            await streams["stdin"].close()
            out = await read_all(streams["stdout"])
            err = b"" if tty else await read_all(streams["stderr"])
            status = await read_all(streams["error"])
            result = await served
            assert result.exit_code == 3
            assert (out, err) == ((b"HELLO SPDYto stderr", b"") if tty else (b"HELLO SPDY", b"to stderr"))
            assert status == (EXIT3_JSON if version >= 4 else EXIT3_MESSAGE).encode()
            assert sizes == ([TerminalSize(132, 43)] if tty else [])
            await asyncio.wait_for(server.closed.wait(), 2)
    arun(main())


def test_spdy_error_stream_closed_before_outputs() -> None:
    """A v1 client returns at its outputs' EOF: the error must be complete before them."""
    async def main() -> None:
        session = FakeSpdySession()
        open_client_streams(session, stdin=False)
        await serve_remotecommand(Request(), SpdyTransport(session, "channel.k8s.io"),
                                  outputs_then(ExecOutcome(exit_code=3)))
        assert session.close_order[0] == "error"
        assert set(session.close_order) == {"error", "stdout", "stderr"}
    arun(main())
