"""Structured (logfmt) logging; every line carries the call's id/name and trace_id/span_id."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from opentelemetry import trace

from pycrio.tracing.call import current_call
from pycrio.tracing.call_span import STAND_INS
from pycrio.tracing.logs import SpanEventHandler, severity

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG, "trace": TRACE}


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' ="\\\n\t'):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    """`time=... level=info msg="..." id=... name=... trace_id=... span_id=...` (logrus text style)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"time={ts}.{int(record.created % 1 * 1_000_000):06d}Z",
            f"level={severity(record.levelno).lower()}",
            f"msg={_quote(record.getMessage())}",
        ]
        call = current_call.get()
        if call is not None:
            parts.append(f"id={call.request_id}")
            parts.append(f"name={call.method}")
        span = trace.get_current_span()
        if type(span) in STAND_INS:  # ids chosen now, the span made later with them
            trace_id, span_id = span.log_ids()
        else:
            ctx = span.get_span_context()
            trace_id, span_id = (ctx.trace_id, ctx.span_id) if ctx.is_valid else (0, 0)
        if trace_id and span_id:
            parts.append(f"trace_id={trace_id:032x}")
            parts.append(f"span_id={span_id:016x}")
        if not record.name.startswith("pycrio"):
            parts.append(f"logger={record.name}")
        if record.exc_info:
            parts.append(f"error={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(level: str, stream: TextIO | None = None) -> None:
    """Configure the root logger once for the daemon: logfmt to stderr, and span events for the
    log records of traced calls (tracing may be turned on by a reload, so always installed)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    out = logging.StreamHandler(stream or sys.stderr)
    out.setFormatter(LogfmtFormatter())
    root.addHandler(out)
    root.addHandler(SpanEventHandler())
    set_level(level)


def set_level(level: str) -> None:
    """Change the daemon's log level (at start-up and on a configuration reload)."""
    logging.getLogger().setLevel(LEVELS[level])
    # gRPC's and OpenTelemetry's own chatter below warning is not ours to print at debug.
    for name in ("grpc", "opentelemetry"):
        logging.getLogger(name).setLevel(max(LEVELS[level], logging.INFO))
