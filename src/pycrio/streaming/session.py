"""The seam between the stream server and whoever runs the process: one session's streams.

The protocol layer (SPDY or WebSocket, remotecommand v1..v5) decodes what the client sends into a
`SessionIO` and encodes what the runtime writes into it; the runtime ("oci" now, the pod monitor
later) only sees this class. Everything here lives on the stream server's asyncio loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Awaitable, Callable

Sink = Callable[[bytes], Awaitable[None]]
"""Writes one chunk to the client; awaiting it is the back-pressure (flow control)."""


@dataclass(frozen=True)
class TerminalSize:
    width: int
    height: int


@dataclass
class SessionCounters:
    """Bytes through one session, for its span and the streaming metrics."""

    bytes_in: int = 0  # client -> process (stdin, port-forward upload)
    bytes_out: int = 0  # process -> client (stdout + stderr, port-forward download)


class ClientGone(Exception):
    """The client closed the connection (or it broke) while the session was still writing."""


@dataclass
class SessionIO:
    """The client's side of one exec or attach session.

    `stdin` carries what the client types or pipes, chunk by chunk; `b""` once means the client
    half-closed stdin (EOF), and nothing follows it. `resizes` carries terminal sizes (tty only;
    the first one usually arrives right after the session opens). `client_gone` is set when the
    connection ends, whatever the state of the process: a runtime that sees it stops feeding
    stdin and ends an attach; an exec'd process it leaves to finish or kills (see the runtime).
    `write_stdout`/`write_stderr` raise ClientGone once the client is gone; with tty there is only
    stdout (the terminal merges both)."""

    tty: bool
    stdin_enabled: bool
    stdout_enabled: bool
    stderr_enabled: bool
    stdout_sink: Sink | None = None
    stderr_sink: Sink | None = None
    stdin: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    resizes: asyncio.Queue[TerminalSize] = field(default_factory=asyncio.Queue)
    client_gone: asyncio.Event = field(default_factory=asyncio.Event)
    counters: SessionCounters = field(default_factory=SessionCounters)

    async def write_stdout(self, data: bytes) -> None:
        await self._write(self.stdout_sink, data)

    async def write_stderr(self, data: bytes) -> None:
        # with a tty the terminal has one output stream: stderr goes where stdout goes
        await self._write(self.stdout_sink if self.tty else self.stderr_sink, data)

    async def _write(self, sink: Sink | None, data: bytes) -> None:
        if self.client_gone.is_set():
            raise ClientGone("the client closed the stream")
        if sink is None or not data:
            return  # the client did not ask for this stream: its output is dropped
        self.counters.bytes_out += len(data)
        await sink(data)

    def feed_stdin(self, data: bytes) -> None:
        """Called by the protocol layer for each stdin chunk (b"" at the client's EOF)."""
        self.counters.bytes_in += len(data)
        self.stdin.put_nowait(data)

    async def read_stdin(self) -> bytes:
        """The next stdin chunk; b"" at EOF or when the client is gone."""
        if self.client_gone.is_set() and self.stdin.empty():
            return b""
        getter = asyncio.ensure_future(self.stdin.get())
        gone = asyncio.ensure_future(self.client_gone.wait())
        try:
            done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if getter in done:
            return getter.result()
        getter.cancel()
        return b""


@dataclass(frozen=True)
class ExecOutcome:
    """How an exec ended: the exit code, or an error that says why it could not run."""

    exit_code: int | None = None
    error: str = ""
