"""Tracing, set up once: the provider, the CRI interceptor, log-to-span events, step spans.

Code below the server only uses `step_span` to time a step as a child of the current call.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from pycrio.tracing.attributes import put_attributes
from pycrio.tracing.call import CallInfo, current_call

if TYPE_CHECKING:
    from pycrio.tracing.interceptor import CallRecorder, CRIServerInterceptor, FixedSpanPolicy, SpanMode, SpanPolicy
    from pycrio.tracing.provider import Tracing

# Imported on first use: they pull in gRPC and the OTLP exporter, which a process that only needs
# step_span or current_call (pycrio-monitor with tracing off) should not pay for.
_LAZY = {
    "CallRecorder": "pycrio.tracing.interceptor",
    "CRIServerInterceptor": "pycrio.tracing.interceptor",
    "FixedSpanPolicy": "pycrio.tracing.interceptor",
    "SpanMode": "pycrio.tracing.interceptor",
    "SpanPolicy": "pycrio.tracing.interceptor",
    "Tracing": "pycrio.tracing.provider",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


_STEP_TRACER = trace.get_tracer("pycrio")


class _StepSpan:
    """What `tracer.start_as_current_span(name, attributes=...)` does, as one small class: the
    span is current inside the block, an exception escaping it is recorded on the span and sets
    its status to ERROR (`<type>: <message>`, as the SDK's use_span does), and the span ends on exit.
    The SDK's version runs two generator-based context managers per step (a fifth of a step span's
    cost on the request thread)."""

    __slots__ = ("_name", "_attributes", "_kind", "_span", "_token")

    def __init__(self, name: str, attributes: dict[str, Any], kind: trace.SpanKind = trace.SpanKind.INTERNAL) -> None:
        self._name = name
        self._attributes = attributes
        self._kind = kind

    def __enter__(self) -> trace.Span:
        span = self._span = _STEP_TRACER.start_span(self._name, kind=self._kind)
        if self._attributes and span.is_recording():
            put_attributes(span, self._attributes)
        self._token = otel_context.attach(trace.set_span_in_context(span))
        return span

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        otel_context.detach(self._token)
        span = self._span
        # Only Exception subclasses are errors (not GeneratorExit, KeyboardInterrupt), as in the SDK.
        if isinstance(exc, Exception) and span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()


def step_span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A child span of the current call for one step (pull a layer, create a container...).

    Without a recording parent it costs a context check and opens nothing (the context then
    yields a non-recording span, so `span.set_attribute` works either way).
    """
    if not trace.get_current_span().is_recording():
        return nullcontext(trace.INVALID_SPAN)
    return _StepSpan(name, attributes)


def child_span(name: str, kind: trace.SpanKind, attributes: dict[str, Any]) -> AbstractContextManager[Any]:
    """`step_span` with a span kind (a CLIENT span around a call to another process)."""
    if not trace.get_current_span().is_recording():
        return nullcontext(trace.INVALID_SPAN)
    return _StepSpan(name, attributes, kind)


__all__ = [
    "CRIServerInterceptor",
    "CallInfo",
    "CallRecorder",
    "FixedSpanPolicy",
    "SpanMode",
    "SpanPolicy",
    "Tracing",
    "child_span",
    "current_call",
    "step_span",
]
