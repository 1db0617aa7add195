"""Tracing, set up once: the provider, the CRI interceptor, log-to-span events, step spans.

Code below the server only uses `step_span` to time a step as a child of the current call.
"""

from __future__ import annotations

import importlib
import logging
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation import _SPAN_KEY

from pycrio.tracing.attributes import put_attributes
from pycrio.tracing.call import CallInfo, current_call
from pycrio.tracing.call_span import STAND_INS, DeferredStepSpan, StepDeferral, runtime_context_var

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
_CONTEXT_VAR = runtime_context_var()  # OpenTelemetry's current context, read and set directly where it can be
log = logging.getLogger("pycrio.tracing")


class _StepSpan:
    """What `tracer.start_as_current_span(name, attributes=...)` does, as one small class: the
    span is current inside the block, an exception escaping it is recorded on the span and sets
    its status to ERROR (`<type>: <message>`, as the SDK's use_span does), and the span ends on exit.
    The SDK's version runs two generator-based context managers per step (a fifth of a step span's
    cost on the request thread).

    Where the tracer's provider defers step spans (`LightTracer.step_deferral`, the pipeline's
    `DeferredSpans`), step_span returns a `DeferredStepSpan` instead: a stand-in, made after the
    step unless something uses it during the step (a nested step, a log line:
    pycrio.tracing.call_span). This class makes the span at once (a CLIENT span, an eager step name)."""

    __slots__ = ("_name", "_attributes", "_kind", "_context", "_span", "_token")

    def __init__(
        self, name: str, attributes: dict[str, Any], context: otel_context.Context, kind: trace.SpanKind | None = None
    ) -> None:
        self._name = name
        self._attributes = attributes
        self._context = context  # the current one: its span is the recording parent
        self._kind = kind  # None: INTERNAL

    def __enter__(self) -> trace.Span:
        tracer = _step_tracer()[0]
        span = self._span = tracer.start_span(self._name, kind=self._kind or trace.SpanKind.INTERNAL)
        if self._attributes and span.is_recording():
            put_attributes(span, self._attributes)
        context = trace.set_span_in_context(span)
        var = _CONTEXT_VAR
        self._token = var.set(context) if var is not None else otel_context.attach(context)
        return span

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        var = _CONTEXT_VAR
        if var is None:
            otel_context.detach(self._token)
        else:
            try:
                var.reset(self._token)
            except Exception:  # noqa: BLE001 - as otel_context.detach: logged, the step goes on
                log.exception("Failed to detach context")
        span = self._span
        # Only Exception subclasses are errors (not GeneratorExit, KeyboardInterrupt), as in the SDK.
        if isinstance(exc, Exception) and span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()


def _step_tracer() -> tuple[trace.Tracer, StepDeferral | None]:
    """step_span's tracer (the global provider's, once there is one) and its provider's step
    deferral; resolved once per `_STEP_TRACER` (tests swap it), as ProxyTracer keeps its real one."""
    global _RESOLVED
    source = _STEP_TRACER
    if _RESOLVED[0] is source:
        return _RESOLVED[1], _RESOLVED[2]
    tracer = source
    if type(tracer) is trace.ProxyTracer:
        tracer = tracer._real_tracer or tracer._tracer  # the global provider's, once there is one
    deferral = getattr(tracer, "step_deferral", None)
    if type(source) is not trace.ProxyTracer or source._real_tracer is tracer:  # settled: kept from now on
        _RESOLVED = (source, tracer, deferral)
    return tracer, deferral


_RESOLVED: tuple[Any, trace.Tracer, StepDeferral | None] = (None, _STEP_TRACER, None)
_NO_STEP = nullcontext(trace.INVALID_SPAN)  # stateless: one for every step without a recording parent


def _recording_context() -> otel_context.Context | None:
    """The current context when its span records (a step can be its child), else None; a
    stand-in that is known to record stays one (its step is made after it, below it)."""
    var = _CONTEXT_VAR
    context = var.get() if var is not None else otel_context.get_current()
    span = context.get(_SPAN_KEY)
    if span is None:
        return None
    if type(span) in STAND_INS:
        return context if span.will_record() else None
    return context if span.is_recording() else None


def step_span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A child span of the current call for one step (pull a layer, create a container...).

    Without a recording parent it costs a context check and opens nothing (the context then
    yields a non-recording span, so `span.set_attribute` works either way). Where the provider
    defers step spans, the context manager is the step's stand-in itself (`DeferredStepSpan`).
    """
    var = _CONTEXT_VAR
    context = var.get() if var is not None else otel_context.get_current()
    parent = context.get(_SPAN_KEY)
    if parent is None:
        return _NO_STEP
    if type(parent) in STAND_INS:
        if not parent.will_record():
            return _NO_STEP
    elif not parent.is_recording():
        return _NO_STEP
    resolved = _RESOLVED
    tracer, deferral = (resolved[1], resolved[2]) if resolved[0] is _STEP_TRACER else _step_tracer()
    spans = deferral.current if deferral is not None else None
    if spans is not None and name not in spans.eager_methods:
        return DeferredStepSpan.starting(spans, tracer, name, attributes, context)
    return _StepSpan(name, attributes, context)


def child_span(name: str, kind: trace.SpanKind, attributes: dict[str, Any]) -> AbstractContextManager[Any]:
    """`step_span` with a span kind (a CLIENT span around a call to another process), made at
    once: its context goes to that process."""
    context = _recording_context()
    if context is None:
        return _NO_STEP
    return _StepSpan(name, attributes, context, kind)


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
