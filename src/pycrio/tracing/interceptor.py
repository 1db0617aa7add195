"""The one server interceptor: request id, debug request/response logs, one SERVER span per call."""

from __future__ import annotations

import contextvars
import enum
import logging
import time
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, NoReturn, Protocol

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pycrio.errors import CRIError, grpc_status
from pycrio.tracing.call import CallInfo, current_call, new_request_id
from pycrio.tracing.call_span import DeferredCallSpan, DeferredSpans, end_call_span, is_w3c_traceparent
from pycrio.tracing.call_span import runtime_context_var as runtime_context_var
from pycrio.tracing.call_span import w3c_parent as w3c_parent

log = logging.getLogger("pycrio.server")

# Big List*/Stream* responses are logged compactly: full dumps once made CRI-O miss gRPC deadlines.
MAX_LOGGED_LIST = 2048
PROPAGATION_KEYS = frozenset(("traceparent", "tracestate", "baggage"))

# The status attributes a call span ends with, under the tutorial's (older) RPC semantic conventions
# and the newer ones kubelet's otelgrpc uses on its client spans (semconv v1.40: `rpc.system.name`,
# `rpc.response.status_code` as the canonical code name), so one query finds both sides. Made once
# per code.
STATUS_ATTRIBUTES: dict[grpc.StatusCode, dict[str, int | str]] = {
    code: {"rpc.grpc.status_code": code.value[0], "rpc.response.status_code": code.name} for code in grpc.StatusCode
}
_OK = grpc.StatusCode.OK
_STATUS_OK = STATUS_ATTRIBUTES[_OK]
_W3C_PROPAGATORS = (TraceContextTextMapPropagator, W3CBaggagePropagator)
_new_tuple = tuple.__new__
_new_object = object.__new__


def is_w3c(textmap: object) -> bool:
    """Whether the global propagator is W3C trace context (and baggage) only, as pycrio sets it."""
    propagators = getattr(textmap, "_propagators", (textmap,))
    types = [type(p) for p in propagators]
    return TraceContextTextMapPropagator in types and all(t in _W3C_PROPAGATORS for t in types)


def span_attributes(method: str) -> dict[str, str]:
    """The start attributes of a call span of `method` (all but the request id), made once per method."""
    service, _, rpc_method = method[1:].rpartition("/")
    return {
        "rpc.system": "grpc",
        "rpc.system.name": "grpc",
        "rpc.service": service,
        "rpc.method": rpc_method,
        "name": method,
    }


def describe(message: Message) -> str:
    """One-line text of a message, cut after MAX_LOGGED_LIST characters for list replies."""
    text = text_format.MessageToString(message, as_one_line=True)
    name = type(message).__name__
    if len(text) > MAX_LOGGED_LIST and (name.startswith("List") or name.startswith("Stream")):
        return f"{text[:MAX_LOGGED_LIST]}... ({len(text) - MAX_LOGGED_LIST} more characters)"
    return text


class SpanMode(enum.Enum):
    """Which calls of a method get a span."""

    NONE = 0  # tracing is off: no span objects at all
    WITH_PARENT = 1  # only calls carrying a caller's W3C context (a root would never be recorded)
    ALL = 2  # every call


class SpanPolicy(Protocol):
    """Where spans come from and which calls get one (pycrio.tracing.Tracing in the daemon).

    `deferred_spans`, when not None, makes the span of a call with a lone W3C parent or none
    after the call, unless the call uses it (pycrio.tracing.call_span)."""

    @property
    def tracer(self) -> trace.Tracer: ...

    @property
    def deferred_spans(self) -> DeferredSpans | None: ...

    def span_mode(self, method: str) -> SpanMode: ...


class CallRecorder(Protocol):
    """Takes the outcome of every call (pycrio.metrics.CRIMetrics in the daemon)."""

    def record_call(self, method: str, code: grpc.StatusCode, seconds: float) -> None: ...


class FixedSpanPolicy:
    """A tracer and one mode for every method; every span made on the call's thread."""

    deferred_spans: DeferredSpans | None = None

    def __init__(self, tracer: trace.Tracer, mode: SpanMode = SpanMode.ALL) -> None:
        self.tracer = tracer
        self._mode = mode

    def span_mode(self, method: str) -> SpanMode:
        return self._mode


_NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})  # shared by every call without a span


class _Call:
    """Per-call bookkeeping shared by the unary and streaming wrappers.

    Made by `_begin` without a constructor call (`_new_object` and the three fields every call
    has: the rest are these class defaults until a call sets them): a constructor call's frame
    cost more than all of its stores, on every call, traced or not."""

    method: str
    request_id: str
    started: float
    attributes: Mapping[str, str] = _NO_ATTRIBUTES  # a span's start attributes, set with the span
    span: trace.Span | None = None
    var_token: contextvars.Token[CallInfo | None] | None = None
    span_token: object = None
    code = grpc.StatusCode.OK
    message = ""


def _keep_thread_pool(inner: Callable[..., Any], outer: Callable[..., Any]) -> None:
    """The wrapper runs where the handler would have: on its own pool when it has one."""
    pool = getattr(inner, "experimental_thread_pool", None)
    if pool is not None:
        outer.experimental_thread_pool = pool  # type: ignore[attr-defined]


class CRIServerInterceptor(grpc.ServerInterceptor):
    """Wraps every unary and server-streaming CRI handler.

    `spans` decides per call (its answer may change at run time, on a configuration reload):
    with tracing off no span objects are made at all; for a method whose calls without a W3C
    parent would never be recorded (effective root rate 0, errors not kept), such a call gets no
    span either (the parent-based sampler would make it a non-recording span). `metrics`, when
    given, is told every call's method, status code and duration.
    """

    def __init__(self, spans: SpanPolicy | None = None, metrics: CallRecorder | None = None) -> None:
        self._spans = spans
        self._metrics = metrics
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._textmap: object = None  # the global propagator last checked, and whether it is W3C only
        self._textmap_w3c = False
        self._context_var = runtime_context_var()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        # Runs on gRPC's polling thread for every call: the wrapped handler is built once per method.
        method: str = details.method  # type: ignore[attr-defined]
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler = continuation(details)
            if handler is None:
                return None
            wrapped = self._wrap(method, handler)
            self._handlers[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        attributes = span_attributes(method)
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            def unary(request: Message, context: grpc.ServicerContext) -> Message:
                call = self._begin(method, attributes, request, context)
                try:
                    response = behavior(request, context)
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("Response: %s: %s", type(response).__name__, describe(response))
                    return response
                except Exception as exc:  # noqa: BLE001 - every failure becomes a gRPC status
                    self._fail(call, exc, context)
                finally:
                    self._end(call)

            _keep_thread_pool(behavior, unary)
            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            def unary_stream(request: Message, context: grpc.ServicerContext) -> Iterator[Message]:
                call = self._begin(method, attributes, request, context)
                try:
                    for response in stream_behavior(request, context):
                        if log.isEnabledFor(logging.DEBUG):
                            log.debug("Response: %s: %s", type(response).__name__, describe(response))
                        yield response
                except GeneratorExit:
                    call.code, call.message = grpc.StatusCode.CANCELLED, "stream cancelled by the client"
                    raise
                except Exception as exc:  # noqa: BLE001
                    self._fail(call, exc, context)
                finally:
                    self._end(call)

            _keep_thread_pool(stream_behavior, unary_stream)
            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # CRI has no client-streaming methods

    def _begin(
        self, method: str, attributes: dict[str, str], request: Message, context: grpc.ServicerContext
    ) -> _Call:
        request_id = new_request_id()
        info = _new_tuple(CallInfo, (request_id, method))  # CallInfo(request_id, method), no __new__ frame
        call = _new_object(_Call)
        call.method = method
        call.request_id = request_id
        call.started = time.perf_counter() if self._metrics is not None else 0.0
        spans = self._spans
        mode = spans.span_mode(method) if spans is not None else SpanMode.NONE
        if mode is not SpanMode.NONE:
            assert spans is not None
            caller = self._caller(context)
            deferred = spans.deferred_spans
            if deferred is not None and type(caller) is not dict and method not in deferred.eager_methods:
                # The usual call (a lone W3C parent, or none) of a method whose calls leave their
                # spans alone: its span is made after the call, unless the call uses it before
                # (pycrio.tracing.call_span).
                if caller is not None or mode is SpanMode.ALL:
                    span, current = deferred.start(method, caller)
                    self._enter(call, attributes, span, current)
            else:
                if caller is None:
                    parent = None
                elif type(caller) is str:
                    parent = w3c_parent(caller, checked=True)
                else:
                    parent = propagate.extract(caller)
                if parent is not None or mode is SpanMode.ALL:
                    span = spans.tracer.start_span(method, context=parent, kind=SpanKind.SERVER)
                    if parent is not None and len(parent) == 1 and _SPAN_KEY in parent:  # w3c_parent's
                        current = otel_context.Context({_SPAN_KEY: span})  # what set_span_in_context makes of it
                    else:
                        current = trace.set_span_in_context(span, parent)
                    self._enter(call, attributes, span, current)
        call.var_token = current_call.set(info)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Request: %s: %s", type(request).__name__, describe(request))
        return call

    def _enter(self, call: _Call, attributes: dict[str, str], span: trace.Span, current: otel_context.Context) -> None:
        """`span` is the call's, current (in `current`) until the call ends."""
        call.span = span
        call.attributes = attributes  # written with the status at the end, in one step
        var = self._context_var
        call.span_token = var.set(current) if var is not None else otel_context.attach(current)

    def _caller(self, context: grpc.ServicerContext) -> str | dict[str, str] | None:
        """The caller's W3C context in the call's metadata: None without a `traceparent` (the
        common case); the header itself when it is the only propagation header, of the exact
        form kubelet and crictl send (`is_w3c_traceparent`), while the global propagator is
        W3C's (the usual traced call); else all the propagation headers, for the propagator."""
        carrier = None
        for md in context.invocation_metadata():
            if md.key in PROPAGATION_KEYS:
                if carrier is None:
                    carrier = {}
                carrier[md.key] = md.value
        if carrier is None:
            return None
        traceparent = carrier.get("traceparent")
        if traceparent is None:
            return None
        if len(carrier) == 1:  # no tracestate, no baggage
            textmap = propagate.get_global_textmap()
            if textmap is not self._textmap:
                self._textmap, self._textmap_w3c = textmap, is_w3c(textmap)
            if self._textmap_w3c and is_w3c_traceparent(traceparent):
                return traceparent
        return carrier

    def _fail(self, call: _Call, exc: Exception, context: grpc.ServicerContext) -> NoReturn:
        """Record the call's status and end it with that status (context.abort raises)."""
        if not isinstance(exc, CRIError):
            code = context.code()  # set when the handler called context.abort()
            if code is not None and code is not grpc.StatusCode.OK:
                details = context.details()
                if isinstance(details, bytes):
                    details = details.decode("utf-8", "replace")
                call.code, call.message = code, details or str(exc)
                log.debug("Response error: %s", call.message)
                raise exc
        call.code, call.message, internal = grpc_status(exc)
        if internal:
            log.error("%s failed: %s", call.method, call.message, exc_info=exc)
        log.debug("Response error: %s", call.message)
        context.abort(call.code, call.message)
        raise AssertionError("context.abort returned")  # pragma: no cover

    def _end(self, call: _Call) -> None:
        if self._metrics is not None:
            try:
                self._metrics.record_call(call.method, call.code, time.perf_counter() - call.started)
            except Exception:  # noqa: BLE001 - metrics never fail a call
                log.exception("recording metrics of %s failed", call.method)
        span = call.span
        if span is not None:
            code = call.code
            if code is _OK:  # (an enum's hash is a Python call)
                status, error = _STATUS_OK, None
            else:
                status, error = STATUS_ATTRIBUTES[code], f"{code.name}: {call.message}"
            if type(span) is DeferredCallSpan:
                span.finish(call.attributes, call.request_id, status, error)
            else:
                end_call_span(span, call.attributes, call.request_id, status, error)
        token = call.span_token
        if token is not None:
            var = self._context_var
            if var is None:
                otel_context.detach(token)  # type: ignore[arg-type]
            else:
                try:
                    var.reset(token)  # type: ignore[arg-type]
                except Exception:  # noqa: BLE001 - as otel_context.detach: logged, the call goes on
                    log.exception("Failed to detach context")
        assert call.var_token is not None
        current_call.reset(call.var_token)
