"""Tracing, set up once: the provider, the CRI interceptor, log-to-span events, step spans.

Code below the server only uses `step_span` to time a step as a child of the current call.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

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


def step_span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A child span of the current call for one step (pull a layer, create a container...).

    Without a recording parent it costs a context check and opens nothing (the context then
    yields a non-recording span, so `span.set_attribute` works either way).
    """
    if not trace.get_current_span().is_recording():
        return nullcontext(trace.INVALID_SPAN)
    return _STEP_TRACER.start_as_current_span(name, attributes=attributes)


__all__ = [
    "CRIServerInterceptor",
    "CallInfo",
    "CallRecorder",
    "FixedSpanPolicy",
    "SpanMode",
    "SpanPolicy",
    "Tracing",
    "current_call",
    "step_span",
]
