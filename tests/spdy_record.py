"""Minimal Kubernetes remotecommand (v4) and port-forward servers on pycrio's SPDY session.

The client is contrib/tools/spdy-recorder (client-go's remotecommand.NewSPDYExecutor, and
portforward over spdy.NewDialerForStreaming, built the way crictl builds its clients).
tests/test_spdy.py runs it against `ExecServer`/`ForwardServer` to check that the real spdystream
talks to our session; `python -m tests.spdy_record` re-records the fixtures in tests/data/spdy/
(the raw bytes each side sent after the HTTP upgrade).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pycrio.streaming.spdy import SpdySession, SpdyStream

ROOT = Path(__file__).resolve().parent.parent
CLIENT_SRC = ROOT / "contrib" / "tools" / "spdy-recorder"
DATA = Path(__file__).resolve().parent / "data" / "spdy"


def build_client(dest_dir: Path) -> Path:
    """Builds the Go client (module cache and build cache make a rebuild take seconds)."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    out = dest_dir / "spdy-client"
    subprocess.run([go, "build", "-o", str(out), "."], cwd=CLIENT_SRC, check=True,
                   capture_output=True, timeout=900, env={**os.environ, "CGO_ENABLED": "0"})
    return out


def pattern(n: int) -> bytes:
    """The bytes the Go client's -stdin-bytes sends (its patternReader)."""
    out = bytearray(n)
    state = 1
    for i in range(n):
        state = (state * 1103515245 + 12345) & 0xFFFFFFFF
        out[i] = (state >> 16) & 0xFF
    return bytes(out)


class TeeReader:
    def __init__(self, inner: asyncio.StreamReader) -> None:
        self.inner = inner
        self.data = bytearray()

    async def readexactly(self, n: int) -> bytes:
        chunk = await self.inner.readexactly(n)
        self.data += chunk
        return chunk


class TeeWriter:
    def __init__(self, inner: asyncio.StreamWriter) -> None:
        self.inner = inner
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data
        self.inner.write(data)

    async def drain(self) -> None:
        await self.inner.drain()

    def close(self) -> None:
        self.inner.close()


def exit_status(code: int) -> bytes:
    """The v4 error-stream Status for a non-zero exit code."""
    return json.dumps({
        "metadata": {}, "status": "Failure",
        "message": f"command terminated with non-zero exit code: exit status {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }).encode()


@dataclass
class Exchange:
    """One upgraded connection: the request, what each side sent, what the server saw."""

    request: bytes = b""
    client_bytes: bytes = b""
    server_bytes: bytes = b""
    streams: list[dict[str, str]] = field(default_factory=list)
    stdin_bytes: int = 0
    stdin_sha256: str = ""
    error: str = ""


class UpgradeServer:
    """Answers the SPDY/3.1 upgrade on 127.0.0.1 and runs one session per connection, recording
    the bytes each way."""

    protocol = ""

    def __init__(self, *, idle_timeout: float | None = None) -> None:
        self.idle_timeout = idle_timeout
        self.exchanges: list[Exchange] = []
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ex = Exchange()
        self.exchanges.append(ex)
        try:
            await self._serve(reader, writer, ex)
        except Exception as e:  # recorded for the test to show
            ex.error = repr(e)
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ex: Exchange) -> None:
        ex.request = await reader.readuntil(b"\r\n\r\n")
        lines = ex.request.decode().split("\r\n")
        target = lines[0].split()[1]
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
        if "spdy/3.1" not in headers.get("upgrade", "").lower():
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                     b"X-Stream-Protocol-Version: " + self.protocol.encode() + b"\r\n\r\n")
        query = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
        tee_r, tee_w = TeeReader(reader), TeeWriter(writer)
        session = SpdySession(tee_r, tee_w, server=True, idle_timeout=self.idle_timeout)
        run = asyncio.create_task(session.run())
        try:
            await self.serve(session, query, ex)
        finally:
            await session.close()
            await run
            ex.client_bytes = bytes(tee_r.data)
            ex.server_bytes = bytes(tee_w.data)

    async def serve(self, session: SpdySession, query: dict[str, str], ex: Exchange) -> None:
        raise NotImplementedError


class ExecServer(UpgradeServer):
    """Serves one exec per connection: stdin echoed to stdout, `stderr` text on stderr, then
    `exit_code` on the error stream. Which streams to expect comes from the URL query, as the
    real server takes it from the Exec request."""

    protocol = "v4.channel.k8s.io"

    def __init__(self, *, exit_code: int = 0, stderr: bytes = b"", delay: float = 0.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.exit_code = exit_code
        self.stderr = stderr
        self.delay = delay

    def url(self, *, stdin: bool, stderr: bool = True, tty: bool = False) -> str:
        q = f"stdin={int(stdin)}&stdout=1&stderr={int(stderr and not tty)}&tty={int(tty)}"
        return f"http://127.0.0.1:{self.port}/exec/token?{q}"

    async def serve(self, session: SpdySession, query: dict[str, str], ex: Exchange) -> None:
        want = {"error"} | {name for name in ("stdin", "stdout", "stderr") if query.get(name) == "1"}
        if query.get("tty") == "1":
            want.add("resize")
        streams: dict[str, SpdyStream] = {}
        while set(streams) != want:
            stream = await asyncio.wait_for(session.accept(), 30)
            if stream is None:
                raise ConnectionError("session ended before all streams arrived")
            ex.streams.append(dict(stream.headers))
            streams[stream.headers.get("streamtype", "")] = stream
        await self._exec(streams, ex)

    async def _exec(self, streams: dict[str, SpdyStream], ex: Exchange) -> None:
        digest = hashlib.sha256()
        stdout = streams.get("stdout")

        async def pump_stdin() -> None:
            stdin = streams.get("stdin")
            if stdin is None:
                return
            while chunk := await stdin.read():
                ex.stdin_bytes += len(chunk)
                digest.update(chunk)
                if stdout is not None:
                    await stdout.write(chunk)
            await stdin.close()

        async def drain_resize() -> None:
            resize = streams.get("resize")
            while resize is not None and await resize.read():
                pass

        resizer = asyncio.create_task(drain_resize())
        await pump_stdin()
        await asyncio.sleep(self.delay)
        ex.stdin_sha256 = digest.hexdigest()
        if self.stderr and "stderr" in streams:
            await streams["stderr"].write(self.stderr)
        for name in ("stdout", "stderr"):
            if name in streams:
                await streams[name].close()
        if self.exit_code:
            await streams["error"].write(exit_status(self.exit_code))
        await streams["error"].close()
        resizer.cancel()


class ForwardServer(UpgradeServer):
    """portforward.k8s.io: each (error, data) stream pair of a requestID is one connection, echoed
    back until the client half-closes; then both streams are closed. The session lasts until the
    client ends it."""

    protocol = "portforward.k8s.io"

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/portforward/token"

    async def serve(self, session: SpdySession, query: dict[str, str], ex: Exchange) -> None:
        errors: dict[str, asyncio.Future[SpdyStream]] = {}
        tasks = []

        def error_stream(rid: str) -> asyncio.Future[SpdyStream]:
            return errors.setdefault(rid, asyncio.get_running_loop().create_future())

        async def echo(data: SpdyStream) -> None:
            while chunk := await data.read():
                ex.stdin_bytes += len(chunk)
                await data.write(chunk)
            await data.close()
            err = await asyncio.wait_for(error_stream(data.headers.get("requestid", "")), 30)
            await err.close()

        while (stream := await session.accept()) is not None:
            ex.streams.append(dict(stream.headers))
            kind, rid = stream.headers.get("streamtype"), stream.headers.get("requestid", "")
            if kind == "error":
                error_stream(rid).set_result(stream)
            elif kind == "data":
                tasks.append(asyncio.create_task(echo(stream)))
            else:
                stream.reset()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class ClientResult:
    returncode: int
    stdout_bytes: int
    stdout_sha256: str
    stderr: str
    raw: str
    conns: list[dict[str, str]] = field(default_factory=list)  # port-forward: bytes, sha256 each


async def run_client(binary: Path, url: str, *args: str, timeout: float = 120) -> ClientResult:
    proc = await asyncio.create_subprocess_exec(str(binary), "-url", url, *args,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    text = out.decode()
    fields: dict[str, str] = {}
    for token in text.split():
        if "=" in token:
            k, v = token.split("=", 1)
            fields[k] = v
    stderr = ""
    if "stderr=" in text:
        stderr = json.loads(text.split("stderr=", 1)[1].splitlines()[0])
    conns = [dict(tok.split("=", 1) for tok in line.split()[1:] if "=" in tok)
             for line in text.splitlines() if line.startswith("conn=")]
    return ClientResult(proc.returncode or 0, int(fields.get("stdout_bytes", "-1")),
                        fields.get("stdout_sha256", ""), stderr, text + err.decode(), conns)


SCENARIOS: dict[str, tuple[type[UpgradeServer], dict[str, Any], dict[str, Any], list[str]]] = {
    # name: (server, its settings, url options, client args)
    "exec-stdin": (ExecServer, {"exit_code": 3, "stderr": b"oops\n"}, {"stdin": True}, ["-stdin-bytes", "11"]),
    "exec-tty": (ExecServer, {}, {"stdin": True, "tty": True}, ["-stdin-bytes", "3", "-tty"]),
    # client-go pings every 5 s (transport/spdy PingPeriod): a session that lasts longer sees one
    "exec-ping": (ExecServer, {"delay": 5.5}, {"stdin": False}, []),
    "portforward": (ForwardServer, {}, {}, ["-portforward", "8080", "-send", "5", "-conns", "2"]),
}


async def record(binary: Path, out_dir: Path, only: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (cls, server_opts, url_opts, args) in SCENARIOS.items():
        if only and name not in only:
            continue
        server = cls(**server_opts)
        await server.start()
        try:
            result = await run_client(binary, server.url(**url_opts), *args)  # type: ignore[attr-defined]
        finally:
            await server.stop()
        ex = server.exchanges[0]
        print(f"{name}: client exit {result.returncode}, streams {ex.streams}, "
              f"{len(ex.client_bytes)} bytes in, {len(ex.server_bytes)} out; {result.raw.strip()}")
        if ex.error:
            raise SystemExit(f"{name}: server error {ex.error}")
        (out_dir / f"{name}.request.http").write_bytes(ex.request)
        (out_dir / f"{name}.client.bin").write_bytes(ex.client_bytes)
        (out_dir / f"{name}.server.bin").write_bytes(ex.server_bytes)
        (out_dir / f"{name}.client-result.txt").write_text(result.raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--client", type=Path, help="a built spdy-client (default: build it)")
    ap.add_argument("--out", type=Path, default=DATA)
    ap.add_argument("only", nargs="*", choices=[[], *SCENARIOS], help="scenarios (default: all)")
    ns = ap.parse_args()
    binary = ns.client
    if binary is None:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "pycrio-spdy-client"
        tmp.mkdir(exist_ok=True)
        binary = build_client(tmp)
    asyncio.run(record(binary, ns.out, ns.only))


if __name__ == "__main__":
    sys.exit(main())
