"""The monitor socket's framing: a 4-byte big-endian length, then that many bytes of protobuf.

Both sides use it: the monitor on asyncio streams, the daemon on blocking sockets.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import TypeVar

from google.protobuf.message import Message

MAX_FRAME = 64 * 1024 * 1024  # an ExecSync reply holds up to 2 x 16 MiB of output
_HEADER = struct.Struct(">I")

M = TypeVar("M", bound=Message)


class FrameError(ConnectionError):
    """The peer sent something that is not a frame (too large, cut short, not the message)."""


def encode(message: Message) -> bytes:
    data = message.SerializeToString()
    if len(data) > MAX_FRAME:
        raise FrameError(f"message of {len(data)} bytes is larger than the {MAX_FRAME}-byte frame limit")
    return _HEADER.pack(len(data)) + data


def _decode(kind: type[M], data: bytes) -> M:
    message = kind()
    try:
        message.ParseFromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, but any failure means the same
        raise FrameError(f"not a {kind.__name__}: {exc}") from exc
    return message


def _length(header: bytes) -> int:
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise FrameError(f"frame of {length} bytes announced, the limit is {MAX_FRAME}")
    return length


# --- asyncio (the monitor) ------------------------------------------------------------------


async def read_async(reader: asyncio.StreamReader, kind: type[M]) -> M | None:
    """The next message, or None at a clean end of stream (EOF between frames)."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError("connection closed inside a frame header") from exc
    try:
        data = await reader.readexactly(_length(header))
    except asyncio.IncompleteReadError as exc:
        raise FrameError("connection closed inside a frame") from exc
    return _decode(kind, data)


async def write_async(writer: asyncio.StreamWriter, message: Message) -> None:
    writer.write(encode(message))
    await writer.drain()


# --- blocking sockets (the daemon) ------------------------------------------------------------


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1024 * 1024))
        if not chunk:
            break
        chunks += chunk
    return bytes(chunks)


def read_sync(sock: socket.socket, kind: type[M]) -> M | None:
    """The next message, or None at a clean end of stream; socket timeouts propagate."""
    header = _recv_exactly(sock, _HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise FrameError("connection closed inside a frame header")
    length = _length(header)
    data = _recv_exactly(sock, length)
    if len(data) < length:
        raise FrameError("connection closed inside a frame")
    return _decode(kind, data)


def write_sync(sock: socket.socket, message: Message) -> None:
    sock.sendall(encode(message))
