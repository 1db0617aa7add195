"""Just enough HTTP/1.1 for the stream server: read one request head, write plain responses.

Every streaming request is a single upgrade (SPDY/3.1 or WebSocket) or an error answer, so there
is no keep-alive and no request body: the head is read with a size bound and a deadline, parsed
and validated by h11, and whatever follows it stays in the stream reader for the upgraded
protocol.
"""

from __future__ import annotations

import asyncio
import email.utils
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Iterable
from urllib.parse import parse_qs, urlsplit

import h11

MAX_HEAD = 64 * 1024  # bytes of request line + headers; a bigger head gets 431
HEAD_TIMEOUT = 30.0  # seconds for a client to send its whole request head


class HTTPError(Exception):
    """A request the server answers with `status` and a plain-text `message` (then closes)."""

    def __init__(self, status: int, message: str = "", headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message or HTTPStatus(status).phrase)
        self.status = status
        self.message = message
        self.headers = list(headers)


@dataclass
class HTTPRequest:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    http_version: str
    headers: list[tuple[str, str]] = field(default_factory=list)  # names lower-cased, in order

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        """Every line of header `name`, in order."""
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    def header_tokens(self, name: str) -> list[str]:
        """The comma-separated values of every line of header `name`, trimmed, empty ones dropped."""
        return [t.strip() for v in self.header_values(name) for t in v.split(",") if t.strip()]

    def has_header(self, name: str) -> bool:
        return self.header(name) is not None


def parse_request_head(head: bytes) -> HTTPRequest:
    """Parse a request head (through the blank line). Raises HTTPError(400) when malformed."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max(len(head), 1) + 1)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise HTTPError(exc.error_status_hint or 400, f"bad request: {exc}") from None
    if not isinstance(event, h11.Request):
        raise HTTPError(400, "bad request: incomplete request head")
    target = event.target.decode("ascii", "replace")
    parts = urlsplit(target)
    return HTTPRequest(
        method=event.method.decode("ascii", "replace"),
        target=target,
        path=parts.path or "/",
        query=parse_qs(parts.query, keep_blank_values=True),
        http_version=event.http_version.decode("ascii", "replace"),
        headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
    )


async def read_request_head(
    reader: asyncio.StreamReader, *, max_size: int = MAX_HEAD, timeout: float = HEAD_TIMEOUT
) -> HTTPRequest | None:
    """Read and parse one request head. None when the client closed or stalled before finishing it.

    Raises HTTPError for a head that is too big (431) or malformed (400). The reader's own limit
    must be at least `max_size` (asyncio.start_server(limit=...))."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
        return None
    except asyncio.LimitOverrunError:
        raise HTTPError(431, "request header fields too large") from None
    if len(head) > max_size:
        raise HTTPError(431, "request header fields too large")
    return parse_request_head(head)


def response_head(status: int, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A status line and headers (with Date), through the blank line."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Date: {email.utils.formatdate(usegmt=True)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def plain_response(status: int, message: str = "", headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A complete text/plain response, as Go's http.Error writes it (message plus a newline),
    with Connection: close (the server closes after an error)."""
    body = (message + "\n").encode() if message else b""
    head = list(headers)
    if body:
        head += [("Content-Type", "text/plain; charset=utf-8"), ("X-Content-Type-Options", "nosniff")]
    head += [("Content-Length", str(len(body))), ("Connection", "close")]
    return response_head(status, head) + body


def error_response(err: HTTPError) -> bytes:
    return plain_response(err.status, err.message, err.headers)
