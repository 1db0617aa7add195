"""The CRI call in flight on this thread: its request id and method, for logs and spans."""

from __future__ import annotations

import contextvars
import itertools
import os
import secrets
from typing import Iterator, NamedTuple


class CallInfo(NamedTuple):
    """What identifies one CRI call in every log line it causes (CRI-O's `id` and `name`).

    A NamedTuple (immutable, made per call): cheaper to build than a frozen dataclass."""

    request_id: str
    method: str


current_call: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("pycrio_call", default=None)

_COUNTER_MASK = (1 << 48) - 1
_prefix = ""
_counter: Iterator[int] = iter(())


def _reseed() -> None:
    """A new random prefix and counter start: at import, and in a forked child (which must not
    repeat its parent's ids)."""
    global _prefix, _counter
    bits = secrets.randbits(74)
    _prefix = f"{bits >> 42:08x}-{(bits >> 26) & 0xFFFF:04x}-4{(bits >> 14) & 0xFFF:03x}-{0x8000 | (bits & 0x3FFF):04x}-"
    _counter = itertools.count(secrets.randbits(48))


def new_request_id() -> str:
    """A request id in UUIDv4 form, unique per call: 74 random bits drawn once per process (so
    unique across restarts and processes) and a 48-bit counter from a random start.

    `str(uuid.uuid4())` costs an os.urandom system call and a UUID object per call; this is a
    counter step and one format. `next()` on itertools.count is atomic under the GIL.
    """
    return f"{_prefix}{next(_counter) & _COUNTER_MASK:012x}"


_reseed()
os.register_at_fork(after_in_child=_reseed)
