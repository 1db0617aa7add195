"""Tracing, set up once: the provider, the CRI interceptor, log-to-span events, step spans.

Code below the server only uses `step_span` to time a step as a child of the current call.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import trace

from pycrio.tracing.call import CallInfo, current_call
from pycrio.tracing.interceptor import CallRecorder, CRIServerInterceptor, FixedSpanPolicy, SpanMode, SpanPolicy
from pycrio.tracing.provider import Tracing

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
