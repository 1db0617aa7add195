"""The CRI call in flight on this thread: its request id and method, for logs and spans."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What identifies one CRI call in every log line it causes (CRI-O's `id` and `name`)."""

    request_id: str
    method: str


current_call: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("pycrio_call", default=None)
