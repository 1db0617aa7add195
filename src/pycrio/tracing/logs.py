"""Log records of a CRI call become `log` events on its span (CRI-O's logrus span hook)."""

from __future__ import annotations

import logging

from opentelemetry import context as otel_context
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation import _SPAN_KEY

from pycrio.tracing.attributes import add_plain_event
from pycrio.tracing.call import current_call
from pycrio.tracing.call_span import STAND_INS, runtime_context_var

_CONTEXT_VAR = runtime_context_var()  # OpenTelemetry's current context, read directly where it can be


def severity(levelno: int) -> str:
    """Upper-case level name as CRI-O writes it: WARNING -> WARN, our level 5 -> TRACE."""
    if levelno >= logging.ERROR:
        return "ERROR" if levelno < logging.CRITICAL else "FATAL"
    if levelno >= logging.WARNING:
        return "WARN"
    if levelno >= logging.INFO:
        return "INFO"
    if levelno >= logging.DEBUG:
        return "DEBUG"
    return "TRACE"


_SEVERITIES = {level: severity(level) for level in (5, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)}


class SpanEventHandler(logging.Handler):
    """Adds each record emitted while a recording span is current as a span event named `log`.

    Nothing runs for a call that logs nothing (records below the level are never made); a record
    becomes an event whose attributes skip the SDK's cleaning pass (all str/int). While the
    current span is a stand-in known to record (pycrio.tracing.call_span), the event and an error
    line's status wait in it for the real span, which is made after the call or step. The SDK's own
    records are not made events: it logs them at any point, also while it holds the current span's
    lock (a value cut to OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT), where adding an event would wait on
    that lock forever, and cutting the event's own long message would log again, and again.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("opentelemetry"):
            return
        var = _CONTEXT_VAR  # trace.get_current_span(), without its three Python frames
        span = (var.get() if var is not None else otel_context.get_current()).get(_SPAN_KEY)
        stand_in = type(span) in STAND_INS
        if not (span.will_record() if stand_in else isinstance(span, Span) and span.is_recording()):
            return
        try:
            message = record.getMessage()
            attributes: dict[str, str | int] = {
                "log.severity": _SEVERITIES.get(record.levelno) or severity(record.levelno),
                "log.message": message,
                "code.function": record.funcName,
                "code.filepath": record.pathname,
                "code.lineno": record.lineno,
            }
            call = current_call.get()
            if call is not None:
                attributes["id"] = call.request_id
                attributes["name"] = call.method
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                attributes["exception.type"] = type(exc).__qualname__
                attributes["exception.message"] = str(exc)
            error = message if record.levelno >= logging.ERROR else None
            if stand_in:
                if span.defer_log_event(attributes, error):  # the span made after its call or step gets it
                    return
                span = span.made()
                if not span.is_recording():
                    return
            add_plain_event(span, "log", attributes)
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, error))
        except Exception:  # a log line must never break the call that wrote it
            self.handleError(record)
