"""The CRI log file of one container, in the kubelet's k8s-file format, written by the monitor.

Each line is `<RFC3339Nano UTC> <stdout|stderr> <F|P> <text>`: as conmon, every chunk read from
the container is split at newlines; a piece without its newline (a line longer than the read
buffer, output that stopped mid-line, the end of the output) is written as a `P` (partial) line,
and the rest of that line follows in later pieces, the last one `F`. A chunk's lines share one
timestamp and one write(2); nothing is fsynced per line (only at reopen and close).

Size cap (conmon's log_size_max): a line that would take the file past `max_size` bytes first
truncates the file (conmon reopens it with O_TRUNC) and is written at its start; a single line
longer than the cap is still written whole.

Reopen (ReopenContainerLog, after the kubelet renamed the file to rotate it): the current file is
synced and closed, and a new one is opened at the path, created under a temporary name and
renamed into place as conmon does, so a reader never sees a path without a file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STDOUT = b"stdout"
STDERR = b"stderr"
_MODE = 0o640  # conmon's
_PARTIAL = b"P"
_FULL = b"F"


def timestamp(ns: int) -> bytes:
    """RFC3339 with nanoseconds, in UTC: 2024-05-01T12:00:00.123456789Z."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode() + b".%09dZ" % nanos


def format_lines(stream: bytes, data: bytes, ns: int) -> list[bytes]:
    """The log lines of one chunk of output (each ends in a newline)."""
    prefix = timestamp(ns) + b" " + stream + b" "
    lines = []
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            lines.append(prefix + _PARTIAL + b" " + data[start:] + b"\n")
            break
        lines.append(prefix + _FULL + b" " + data[start : end + 1])
        start = end + 1
    return lines


class ContainerLog:
    """One container's k8s-file log; all methods are quick, non-async and meant for the loop."""

    def __init__(self, path: Path, max_size: int = 0) -> None:
        self.path = Path(path)
        self.max_size = max(int(max_size), 0)  # 0: no cap
        self._fd = -1
        self._size = 0

    def open(self) -> None:
        """Open (create) the file for appending; an existing file is kept (and counts)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _MODE)
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        """Bytes in the current file as this writer counts them."""
        return self._size

    def write(self, stream: bytes, data: bytes) -> None:
        """Log one chunk the container wrote on `stream` (STDOUT or STDERR)."""
        if self._fd < 0 or not data:
            return
        lines = format_lines(stream, data, time.time_ns())
        batch: list[bytes] = []
        batch_size = 0
        for line in lines:
            if self.max_size and self._size + batch_size + len(line) > self.max_size:
                self._write(batch)
                batch, batch_size = [], 0
                self._truncate()
            batch.append(line)
            batch_size += len(line)
        self._write(batch)

    def reopen(self) -> None:
        """Sync and close the current file, then open a fresh one at the path (after rotation)."""
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, _MODE)
        try:
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = 0

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.fsync(fd)
        except OSError:
            pass  # a full or read-only disk: what was written stays written
        finally:
            os.close(fd)

    def _write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        view = memoryview(b"".join(lines))
        while view:
            written = os.write(self._fd, view)
            self._size += written
            view = view[written:]

    def _truncate(self) -> None:
        os.ftruncate(self._fd, 0)  # O_APPEND: the next write goes to the (new) start
        self._size = 0
