"""The SERVER span of one CRI call, made after the call when nothing needed it during the call.

Most CRI calls (kubelet's ListContainers, ContainerStatus, PodSandboxStatus... polls) never use
their span while they run: no log line, no step span, no outgoing call. For those, making the span
on the request thread (reading the caller's `traceparent` into a context, asking the sampler,
building the span, its attributes and status, ending it through the processors) is only latency
added to the call. So the interceptor makes a `DeferredCallSpan` instead, the call's current span:
it keeps the caller's header and the start time, and at the end the end time, status code and
request id. The pipeline's export thread makes the real span from them before each export
(`SpanBatcher.defer`): the same name, kind, parent, trace id, times, attributes and status as the
request thread would have made, through the pipeline's own sampler and span processor.

Three things a call does with its span are kept by the stand-in without making it. A log line's
`log` event (and an error line's ERROR status) waits in the stand-in for the real span; the ids
the log line prints (`log_ids`) are chosen then and given to the real span when it is made. A
step span below it is a stand-in too (below), when the call is known to record without asking
the sampler: a sampled caller's call (ParentBased records it, whatever the rates).

Any other use of a `DeferredCallSpan` while its call runs (any other Span method or SDK field:
`get_span_context` for an outgoing call's `traceparent`, a client span below it) makes the
real span at once, on that thread, through the provider as before; from then on it forwards
there, and the call ends it as usual. A use after the call makes and ends it on that thread (an
ended span, as it would be). Such a use costs more than making the span at the start (the
stand-in's own steps), so a method whose calls used their spans USED_IN_A_ROW times in a row has
its spans made at the start from then on.

What the seams see: for a span made after its call, the sampler is asked and the processors'
`on_start` called on the export thread once the call is over (with the same arguments and the
call's start time), with the sampler and processor of the pipeline the call started under (a
reload in between does not move it). When the queue is full (collector down) or the pipeline is
shutting down, the call's span is made and ended on the request thread instead, where the
queue's own drop rule counts it (or, after a reload, the new pipeline takes it).

Step spans (`pycrio.tracing.step_span`) below a call work the same way (`DeferredStepSpan`):
the stand-in keeps the step's tracer, parent context (whose span may be a stand-in itself: a
call's, or an outer step's), start time, attributes (also those set during the step) and log
events, and is made during the step by a use (an exception escaping the step, an outgoing call)
or after it by the export thread. A span's deferred parent is made first, the same way, so
parents chain. A step name whose spans were used USED_IN_A_ROW times in a row has them made at
the start from then on.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import threading
from time import time_ns
from types import TracebackType
from typing import TYPE_CHECKING, Any, Mapping, Self

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from pycrio.tracing.attributes import add_plain_event, put_attributes
from pycrio.tracing.span_context import SAMPLED, SPAN_CONTEXT_TUPLE

if TYPE_CHECKING:  # (the API alone at run time: pycrio.tracing.logs imports this module)
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace.sampling import Sampler

    from pycrio.tracing.batch import SpanBatcher
    from pycrio.tracing.exporter import ExportHealth
    from pycrio.tracing.span import LightTracer

_W3C_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")  # version 00, lower-case hex
_SAMPLED_LAST_HEX = "13579bdf"  # a traceparent's flags (two lower-case hex digits) with SAMPLED set end in one of these
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16
_new_tuple = tuple.__new__
_new_object = object.__new__
# The flags callers send, made once: the parent's context is kept with its span until export.
_TRACE_FLAGS = {f"{value:02x}": TraceFlags(value) for value in (0x00, 0x01, 0x02, 0x03)}


def runtime_context_var() -> contextvars.ContextVar[otel_context.Context] | None:
    """The ContextVar behind OpenTelemetry's current context when it is the default runtime
    context (OTEL_PYTHON_CONTEXT unset): read, set and reset directly, get_current/attach/detach
    without their two Python calls each. None for any other runtime context."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if type(runtime) is not ContextVarsRuntimeContext:
        return None
    var = getattr(runtime, "_current_context", None)
    return var if isinstance(var, contextvars.ContextVar) else None


_CONTEXT_VAR = runtime_context_var()
log = logging.getLogger("pycrio.tracing")


def is_w3c_traceparent(traceparent: str) -> bool:
    """Whether `traceparent` is a lone header of the exact version-00 form kubelet and crictl
    send (lower-case hex, non-zero ids, nothing around it): what `w3c_parent` reads."""
    return (
        _W3C_TRACEPARENT.fullmatch(traceparent) is not None
        and traceparent[3:35] != _ZERO_TRACE_ID
        and traceparent[36:52] != _ZERO_SPAN_ID
    )


def w3c_parent(traceparent: str, checked: bool = False) -> otel_context.Context | None:
    """The context TraceContextTextMapPropagator extracts from a lone `traceparent` of the exact
    version-00 form kubelet and crictl send (`is_w3c_traceparent`, not asked again when
    `checked`); None for anything else, which the propagator itself then reads. Two thirds of the
    composite propagator's cost (one anchored regex, no getter, no baggage pass); the regex is
    7000 instructions cheaper than checking the slices' characters (bench/span_instructions.py)."""
    if not checked and not is_w3c_traceparent(traceparent):
        return None
    trace_id, span_id, flags_hex = int(traceparent[3:35], 16), int(traceparent[36:52], 16), traceparent[53:]
    flags = _TRACE_FLAGS.get(flags_hex)
    if flags is None:
        flags = TraceFlags(int(flags_hex, 16))
    if SPAN_CONTEXT_TUPLE:  # SpanContext(trace_id, span_id, is_remote=True, ...), valid: ids non-zero, in range
        parent = _new_tuple(SpanContext, (trace_id, span_id, True, flags, DEFAULT_TRACE_STATE, True))
    else:
        parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)
    span = _new_object(NonRecordingSpan)  # NonRecordingSpan(parent): its __init__ sets just this
    span._context = parent
    return otel_context.Context({_SPAN_KEY: span})  # set_span_in_context's, without a copy


def end_call_span(
    span: trace.Span,
    attributes: Mapping[str, str],
    request_id: str,
    status: Mapping[str, int | str],
    error: str | None,
    end_time: int | None = None,
) -> None:
    """End a call's span with its start attributes, request id and status attributes; with
    status ERROR and `error` as its description when the call failed."""
    if span.is_recording():  # our own str/int values: set without the SDK's cleaning pass
        put_attributes(span, {**attributes, "id": request_id, **status}, plain=True)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time)


USED_IN_A_ROW = 3  # calls of a method in a row that used their spans: its spans are then made at once

# Makes every DeferredCallSpan's real span, so that exactly one is made however many threads
# reach it at once (the call's, the export thread, a thread the call's context was copied to).
# Reentrant: making a span may log, and a log record looks for the current span.
_MAKING = threading.RLock()


def _new_making_lock() -> None:
    """A forked child's own lock: another thread may have held the parent's at the fork."""
    global _MAKING
    _MAKING = threading.RLock()


os.register_at_fork(after_in_child=_new_making_lock)


class StepDeferral:
    """Which `DeferredSpans` makes a provider's step spans after their steps: its current
    pipeline's (None: made at once). One per LightTracerProvider, shared by its tracers."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current: DeferredSpans | None = None


class DeferredSpans:
    """Makes one pipeline's call and step spans after their calls and steps: its tracer (a
    LightTracer, for call spans), sampler, span processor and batch processor (whose export
    thread calls `made` on each span that waits)."""

    def __init__(
        self, tracer: LightTracer, sampler: Sampler, processor: SpanProcessor, batch: SpanBatcher, health: ExportHealth
    ) -> None:
        self.tracer = tracer
        self.sampler = sampler
        self.processor = processor
        self.batch = batch
        self._health = health
        # Methods whose calls use their spans (a step, a log line: the mutating CRI calls), and
        # steps whose spans are used (a nested step, a log line): made during the call or step
        # anyway, through the stand-in at a cost of its own, so theirs are made at the start, as
        # before. A name joins after USED_IN_A_ROW calls or steps in a row used theirs.
        self.eager_methods: set[str] = set()
        self._used_in_a_row: dict[str, int] = {}

    def start(self, name: str, traceparent: str | None) -> tuple[DeferredCallSpan, otel_context.Context]:
        """The stand-in span of a call starting now, and the call's context holding it;
        `traceparent` is the caller's header (`is_w3c_traceparent`), None without a parent."""
        span = _new_object(DeferredCallSpan)  # no constructor frame: its fields are these
        span._spans = self
        span._deferred_name = name
        span._traceparent = traceparent
        context = span._deferred_context = otel_context.Context({_SPAN_KEY: span})  # set_span_in_context's, no copy
        span._deferred_start = time_ns()
        return span, context

    def note_use(self, name: str, during_call: bool) -> None:
        """A span of `name` was made during its call or step (used), or after it (not used)."""
        if during_call:
            used = self._used_in_a_row[name] = self._used_in_a_row.get(name, 0) + 1
            if used >= USED_IN_A_ROW:
                self.eager_methods.add(name)
        elif name in self._used_in_a_row:
            self._used_in_a_row[name] = 0

    def _start(
        self, tracer: LightTracer, span: DeferredSpan, parent: otel_context.Context, kind: SpanKind, through_provider: bool
    ) -> trace.Span:
        """The real span of `span`, started at its start: `through_provider`, as any span
        (during the call or step, or when the queue refused it: then the pipeline current now
        takes it); else through this pipeline's own sampler and processor (the export thread,
        or a use after the call), counted as started when sampled as the provider's processor
        counts. With the ids a log line printed and the log events kept for it; a parent still
        deferred is made first."""
        self.note_use(span._deferred_name, through_provider and not span._ended)
        parent_span = parent.get(_SPAN_KEY)
        if type(parent_span) in STAND_INS and parent_span._real is None:
            parent_span.made(through_provider)  # a deferred parent first (made the same way), so that parents chain
        ids = span._ids
        root_trace_id, span_id = ids if ids is not None else (None, None)
        if through_provider:
            real = tracer.start_span(
                span._deferred_name,
                parent,
                kind,
                None,
                (),
                span._deferred_start,
                span_id=span_id,
                root_trace_id=root_trace_id,
            )
        else:
            real = tracer.start_span(
                span._deferred_name,
                parent,
                kind,
                start_time=span._deferred_start,
                sampler=self.sampler,
                processor=self.processor,
                span_id=span_id,
                root_trace_id=root_trace_id,
            )
            made = real.get_span_context()
            if (made[3] if SPAN_CONTEXT_TUPLE and type(made) is SpanContext else made.trace_flags) & SAMPLED:
                self._health.span_started()
        events, error = span._events, span._log_error
        if events is not None or error is not None:
            span._events = span._log_error = None  # the real span's from now on
            if real.is_recording():
                for timestamp, attributes in events or ():
                    add_plain_event(real, "log", attributes, timestamp)
                if error is not None:
                    real.set_status(Status(StatusCode.ERROR, error))
        return real

    def make(self, span: DeferredCallSpan, through_provider: bool) -> trace.Span:
        """The call's span (`_start`), ended if the call is over."""
        traceparent = span._traceparent
        parent = w3c_parent(traceparent, checked=True) if traceparent is not None else None
        if parent is None:  # a root: an empty context, never the current one (it holds the stand-in)
            parent = otel_context.Context()
        real = self._start(self.tracer, span, parent, SpanKind.SERVER, through_provider)
        if span._ended:
            end_call_span(real, span._call_attributes, span._request_id, span._status, span._error, span._deferred_end)
        return real

    def make_step(self, span: DeferredStepSpan, through_provider: bool) -> trace.Span:
        """The step's span (`_start`, by the step's tracer, with the context it started in),
        with its attributes, ended if the step is over."""
        real = self._start(span._tracer, span, span._parent_context, SpanKind.INTERNAL, through_provider)
        attributes = span._step_attributes
        if attributes and real.is_recording():
            put_attributes(real, attributes)
        span._step_attributes = {}  # the real span's from now on
        if span._ended:
            real.end(span._deferred_end)
        return real


class DeferredSpan(trace.Span):
    """A span until something uses it (a call's: `DeferredCallSpan`, a step's:
    `DeferredStepSpan`); see the module docstring.

    Made by `DeferredSpans` (without a constructor); every field has a class default, so that
    reading one never reaches `__getattr__` (which makes the real span). No field shares a name
    with an SDK span's: those are read through `__getattr__`, from the real span."""

    _spans: DeferredSpans
    _deferred_context: otel_context.Context  # the context holding this stand-in
    _deferred_name = ""
    _deferred_start = 0
    _real: trace.Span | None = None  # the real span, once made
    _ended = False  # the call or step is over: its end fields are set
    _making = False
    _deferred_end = 0
    _events: list[tuple[int, dict[str, Any]]] | None = None  # log events (time, attributes) kept for the real span
    _log_error: str | None = None  # an error log line's message: the real span's ERROR status
    _ids: tuple[int, int] | None = None  # (trace id, span id) a log line printed before the span was made
    _sure_to_record = False  # the real span will record, known without making it

    def _make(self, through_provider: bool) -> trace.Span:
        raise NotImplementedError

    def _own_tracer(self) -> LightTracer:
        raise NotImplementedError

    def _new_trace_id(self) -> int:
        """The trace id the real span will have."""
        raise NotImplementedError

    def will_record(self) -> bool:
        """`is_recording()` of the real span, made now only when that is not known without it
        (a sampled caller's call records, and so do the steps below it)."""
        real = self._real
        if real is not None:
            return real.is_recording()
        if self._sure_to_record:
            return True
        if type(self) is DeferredCallSpan:  # known on first use (not at every call's start: most never ask)
            traceparent = self._traceparent
            if traceparent is not None and traceparent[54] in _SAMPLED_LAST_HEX:  # ParentBased records, whatever the rates
                self._sure_to_record = True
                return True
        return self.made().is_recording()

    def log_ids(self) -> tuple[int, int]:
        """(trace id, span id) of the span, for a log line: while it is not made, chosen now and
        given to the real span when it is made ((0, 0): none)."""
        with _MAKING:
            if self._real is None and not self._making and not self._ended and self._own_tracer().light:
                ids = self._ids
                if ids is None:
                    ids = self._ids = (self._new_trace_id(), self._own_tracer().id_generator.generate_span_id())
                return ids
        context = self.made().get_span_context()
        return (context.trace_id, context.span_id) if context.is_valid else (0, 0)

    def defer_log_event(self, attributes: dict[str, Any], error: str | None) -> bool:
        """Keep a log line's `log` event (and, for an error line, its ERROR status) for the real
        span, made later; False when the span is made (or being made) or over: add it to the real one."""
        with _MAKING:
            if self._real is not None or self._ended or self._making:
                return False
            events = self._events
            if events is None:
                events = self._events = []
            events.append((time_ns(), attributes))
            if error is not None:
                self._log_error = error
            return True

    def made(self, through_provider: bool | None = None) -> trace.Span:
        """The real span, made now on this thread if it is not yet (during the call or step
        through the provider, after it through its pipeline's sampler and processor, and then
        ended)."""
        real = self._real
        if real is not None:
            return real
        if through_provider is None:
            through_provider = not self._ended
        with _MAKING:
            real = self._real
            if real is None:
                if self._making:  # used while being made (a log record on its thread): nothing to add to yet
                    return trace.INVALID_SPAN
                self._making = True
                try:
                    real = self._make(through_provider)
                finally:
                    self._making = False
                self._real = real
                context = self._deferred_context
                if context.get(_SPAN_KEY) is self:
                    # From now on the context holds the real span, so the later uses of the
                    # current span reach it directly, not through this stand-in. That Context
                    # is made by `DeferredSpans` alone; a Context refuses item assignment, so
                    # dict's own is used.
                    dict.__setitem__(context, _SPAN_KEY, real)
        return real

    def _hand_over(self) -> None:
        """The call or step is over and its end fields are set (under _MAKING): to the export
        thread, or made and ended here when the queue takes no more (full, or shutting down: a
        reload retired the pipeline meanwhile), where the pipeline current now takes it."""
        self._ended = True
        if not self._spans.batch.defer(self):
            self.made(through_provider=True)

    # -- the Span API, on the real span --------------------------------------------------------
    def get_span_context(self) -> SpanContext:
        return self.made().get_span_context()

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self.made().set_attributes(attributes)

    def set_attribute(self, key: str, value: Any) -> None:
        self.made().set_attribute(key, value)

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None) -> None:
        self.made().add_event(name, attributes, timestamp)

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        self.made().add_link(context, attributes)

    def update_name(self, name: str) -> None:
        self.made().update_name(name)

    def is_recording(self) -> bool:
        return self.made().is_recording()

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        self.made().set_status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, Any] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self.made().record_exception(exception, attributes, timestamp, escaped)

    def end(self, end_time: int | None = None) -> None:
        self.made().end(end_time)

    def __getattr__(self, name: str) -> Any:
        # The SDK span's other fields and methods (`_attributes`, `_add_event`, `name`...), which
        # put_attributes, add_plain_event and readers of the span use.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.made(), name)

    def __repr__(self) -> str:
        state = "made" if self._real is not None else "ended" if self._ended else "deferred"
        return f"{type(self).__name__}({self._deferred_name!r}, {state})"


class DeferredCallSpan(DeferredSpan):
    """A call's current span until something uses it (`DeferredSpans.start`)."""

    _traceparent: str | None = None
    _call_attributes: Mapping[str, str] = {}
    _request_id = ""
    _status: Mapping[str, int | str] = {}
    _error: str | None = None

    def _make(self, through_provider: bool) -> trace.Span:
        return self._spans.make(self, through_provider)

    def _own_tracer(self) -> LightTracer:
        return self._spans.tracer

    def _new_trace_id(self) -> int:
        traceparent = self._traceparent
        if traceparent is not None:
            return int(traceparent[3:35], 16)
        return self._spans.tracer.id_generator.generate_trace_id()

    def finish(
        self, attributes: Mapping[str, str], request_id: str, status: Mapping[str, int | str], error: str | None
    ) -> None:
        """The call is over (`end_call_span`'s arguments): end its span, made by now, or keep
        what it ends with and hand it to the export thread."""
        end_time = time_ns()
        with _MAKING:
            real = self._real
            if real is None:
                self._deferred_end = end_time
                self._call_attributes = attributes
                self._request_id = request_id
                self._status = status
                self._error = error
                self._hand_over()
                return
        end_call_span(real, attributes, request_id, status, error, end_time)


class DeferredStepSpan(DeferredSpan):
    """A step span (`pycrio.tracing.step_span`) until something uses it (`DeferredStepSpan.starting`):
    attributes set on it meanwhile are kept for the real span, as its start attributes are."""

    _tracer: LightTracer  # the step's own tracer (its instrumentation scope)
    _parent_context: otel_context.Context = otel_context.Context()
    _step_attributes: dict[str, Any] = {}
    _sure_to_record = True  # made only below a parent that records (or, known so, will)

    def _make(self, through_provider: bool) -> trace.Span:
        return self._spans.make_step(self, through_provider)

    def _own_tracer(self) -> LightTracer:
        return self._tracer

    def _new_trace_id(self) -> int:
        parent = self._parent_context.get(_SPAN_KEY)
        if type(parent) in STAND_INS:
            return parent.log_ids()[0]
        return parent.get_span_context().trace_id

    _token: contextvars.Token[otel_context.Context] | object | None = None  # the step's context set as current

    @classmethod
    def starting(
        cls, spans: DeferredSpans, tracer: LightTracer, name: str, attributes: dict[str, Any], context: otel_context.Context
    ) -> DeferredStepSpan:
        """The stand-in of a step about to start in `context` (whose span is the recording
        parent), its own context manager (pycrio.tracing.step_span); `attributes` are the
        step's own from now on."""
        span = _new_object(cls)  # no constructor frame
        span._spans = spans
        span._tracer = tracer
        span._deferred_name = name
        span._step_attributes = attributes
        span._parent_context = context
        step_context = span._deferred_context = otel_context.Context(context)
        dict.__setitem__(step_context, _SPAN_KEY, span)  # set_span_in_context's, one copy
        return span

    def __enter__(self) -> Self:
        """The step starts now, its stand-in the current span (what the SDK's
        start_as_current_span does, without its two generator-based context managers)."""
        self._deferred_start = time_ns()
        var = _CONTEXT_VAR
        self._token = var.set(self._deferred_context) if var is not None else otel_context.attach(self._deferred_context)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """The step is over: its context reset; an exception escaping it (an Exception, as in
        the SDK) recorded on the real span, made now, with status ERROR (`<type>: <message>`);
        else its span handed to the export thread."""
        end_time = time_ns()
        var = _CONTEXT_VAR
        if var is None:
            otel_context.detach(self._token)
        else:
            try:
                var.reset(self._token)
            except Exception:  # as otel_context.detach: logged, the step goes on
                log.exception("Failed to detach context")
        if isinstance(exc, Exception):
            if self.is_recording():  # the real span, made here during the step
                self.record_exception(exc)
                self.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            self.end()
            return
        with _MAKING:
            real = self._real
            if real is None:
                self._deferred_end = end_time
                self._ended = True  # _hand_over, inline: a frame less per step
                if not self._spans.batch.defer(self):
                    self.made(through_provider=True)
                return
        real.end(end_time)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        with _MAKING:
            if self._real is None and not self._ended and not self._making:
                self._step_attributes.update(attributes)
                return
        self.made().set_attributes(attributes)

    def set_attribute(self, key: str, value: Any) -> None:
        self.set_attributes({key: value})


# The stand-ins' types, for `type(span) in STAND_INS` (cheaper than an ABC's isinstance).
STAND_INS = (DeferredCallSpan, DeferredStepSpan)

