"""A leaner SDK span and tracer: the same objects to every seam, half the cost per span.

The SDK's `Tracer.start_span` and `Span.end` cost about 17 µs per span here (hot caches) before
pycrio sets a single attribute, and a finished span keeps 3 KB until it is exported. What costs in
a daemon is mostly that memory (cold caches: 212 µs for the SDK's call span path, 141 µs for this
one), so this module makes fewer and smaller objects. Most of the SDK's are bookkeeping a CRI call
span does not use:
- two `BoundedList`s per span (events and links; each a deque of 64 slots and a lock: about
  1.5 KB), made even when the span never gets an event or a link;
- a `ReadableSpan` copy of every span as it ends, handed to the processors;
- new `TraceFlags` objects for every span, instance fields that are the same in every span, and
  `start()` taking the span's lock once more.

`LightTracer` is the SDK's `Tracer` with only `start_span` replaced and `LightSpan` is the SDK's
`Span` with only its constructor, `end` and the event/link storage replaced; every other method is
the SDK's. So the TracerProvider, samplers, id generator, span limits and span processors stay the
SDK's seams, and what a processor or exporter receives is still an SDK `Span` (a `ReadableSpan`).

- Sampling: the provider's sampler decides, with the same arguments, before anything is built.
- Events and links: in a plain list made when the first one is added (until then the span has an
  empty tuple, which reads the same), bounded by the span limits as a `BoundedList` is: the
  oldest goes first, and the drops are counted.
- At the end the span itself goes to the processors, not a copy: once ended, every mutator of the
  span is refused (as the SDK's are), so what the exporter reads cannot change.
- A provider with a single span processor (pycrio's switch) has that processor called directly,
  not through the SDK's list around it; a processor added while a span is open sees neither its
  start nor its end (through the list it would get the end only).
- For a span started with links, whenever the SDK's per-span internal metrics are on
  (OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED), or when a tracer configurator disabled the tracer,
  `start_span` is the SDK's own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from time import time_ns
from typing import Sequence

from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import (
    EventBase,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
    Tracer,
    TracerProvider,
)
from opentelemetry.sdk.trace import Span as SDKSpan
from opentelemetry.sdk.trace._tracer_metrics import NoOpTracerMetrics
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.span import DEFAULT_TRACE_STATE
from opentelemetry.util import types

from pycrio.tracing.call_span import StepDeferral
from pycrio.tracing.span_context import RANDOM_TRACE_ID, SPAN_CONTEXT_TUPLE

logger = logging.getLogger("opentelemetry.sdk.trace")  # the SDK's warnings, under its own name

_UNSET = Status(StatusCode.UNSET)
# The four trace-flag values a new span can have (sampled x random trace id), made once.
_FLAGS = {value: TraceFlags(value) for value in (0x00, 0x01, 0x02, 0x03)}
_RECORD_AND_SAMPLE = Decision.RECORD_AND_SAMPLE
_RECORD_ONLY = Decision.RECORD_ONLY
_NO_ON_ENDING = SpanProcessor._on_ending  # the base class's: does nothing
_new_tuple = tuple.__new__
_new_object = object.__new__

_MAX_TRACE_ID = (1 << 128) - 1
_MAX_SPAN_ID = (1 << 64) - 1


class SpanAttributes(BoundedAttributes):
    """The SDK's `BoundedAttributes` (the same cleaning, limits, drops and immutability: its own
    methods) without a lock of its own and with the usual values on the class.

    Its lock is redundant in a span: every SDK mutator of a span's attributes runs under the
    span's `_lock`, the constructor runs before the span is shared, and `put_attributes` is one
    `dict.update` (atomic under the GIL). One object and one lock fewer per span."""

    _lock = contextlib.nullcontext()  # reusable and reentrant: `with self._lock:` does nothing
    dropped = 0
    _immutable = False

    def __init__(self, maxlen: int | None, max_value_len: int | None, attributes: types.Attributes = None) -> None:
        if maxlen is not None and maxlen < 0:
            raise ValueError("maxlen must be valid int greater or equal to 0")
        if max_value_len is not None and max_value_len < 0:
            raise ValueError("max_value_len must be valid int greater or equal to 0")
        self._dict = {}
        self.maxlen = maxlen
        self.max_value_len = max_value_len
        if attributes:
            self._set_items(attributes)


class LightSpan(SDKSpan):
    """The SDK's `Span`, built without the unused parts (see the module docstring)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a LightSpan is made by LightTracer.start_span")

    # What ReadableSpan.__init__ and Span.__init__ set is set by LightTracer.start_span, on an
    # object made without calling a constructor (the constructor calls alone were more than
    # half the cost of making a span). The fields with the same value in (nearly) every span are
    # class attributes below, shadowed where one differs: a retained span is smaller (what the
    # export thread reads, what each new span allocates).
    _start_time: int | None = None
    _end_time: int | None = None
    _status = _UNSET
    _trace_config = None
    _record_exception = True
    _set_status_on_exception = True
    _events: Sequence[EventBase] = ()
    _links: Sequence[trace_api.Link] = ()
    _record_end_metrics = None

    def get_span_context(self) -> SpanContext:
        return self._context  # the SDK's, without its typing.cast call (three per span made after its step)

    def _add_event(self, event: EventBase) -> None:
        self._append_bounded("_events", "_dropped_events", self._limits.max_events, event, "_add_event")

    def _add_link(self, link: trace_api.Link) -> None:
        self._append_bounded("_links", "_dropped_links", self._limits.max_links, link, "_add_link")

    def _append_bounded(self, field: str, dropped: str, limit: int | None, item: object, caller: str) -> None:
        """Append to the list in `field` (made on the first item), as a BoundedList of `limit`
        would: when full, the oldest item goes and `dropped` counts it."""
        with self._lock:
            if self._end_time is None:
                items = getattr(self, field)
                if type(items) is not list:  # the class's empty tuple: the first item
                    items = []
                    setattr(self, field, items)
                if limit is not None and len(items) >= limit:
                    setattr(self, dropped, getattr(self, dropped) + 1)
                    if not limit:
                        return
                    del items[0]
                items.append(item)
                return
        logger.warning("Tried calling %s on an ended span.", caller)

    _dropped_events = 0
    _dropped_links = 0

    @property
    def dropped_events(self) -> int:
        return self._dropped_events

    @property
    def dropped_links(self) -> int:
        return self._dropped_links

    def end(self, end_time: int | None = None) -> None:
        with self._lock:
            if self._start_time is None:
                raise RuntimeError("Calling end() on a not started span.")
            if self._end_time is not None:
                ended = True
            else:
                ended = False
                self._end_time = end_time if end_time is not None else time_ns()
                self._attributes._immutable = True
        if ended:
            logger.warning("Calling end() on an ended span.")
            return
        processor = self._span_processor
        if type(processor)._on_ending is not _NO_ON_ENDING:
            processor._on_ending(self)
        processor.on_end(self)  # the span itself: nothing can change it once ended


class LightTracer(Tracer):
    """The SDK's `Tracer` whose `start_span` builds a `LightSpan` (see the module docstring)."""

    # Its provider's (LightTracerProvider): whether pycrio.tracing.step_span makes its spans after their steps.
    step_deferral: StepDeferral | None = None

    def start_span(  # noqa: PLR0913 - the API's signature
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[trace_api.Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        *,
        sampler: Sampler | None = None,
        processor: SpanProcessor | None = None,
        span_id: int | None = None,
        root_trace_id: int | None = None,
    ) -> trace_api.Span:
        """The API's `start_span`; `sampler` and `processor`, when given, decide and take the
        span instead of the provider's (a pipeline's own, for a call span made after its call:
        pycrio.tracing.call_span; only where `light`). `span_id`, and `root_trace_id` for a root,
        when given, are the span's ids instead of new ones (ids a log line of a span made after
        its call printed already); only where `light`."""
        if links or not self.light:
            return super().start_span(
                name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
            )
        if sampler is None:
            sampler = self.sampler
        parent_span = (context if context is not None else context_api.get_current()).get(_SPAN_KEY)
        parent = parent_span.get_span_context() if parent_span is not None else None
        if parent is not None and not isinstance(parent, SpanContext):
            raise TypeError("parent_span_context must be a SpanContext or None.")
        ids = self.id_generator
        if parent is not None:
            if SPAN_CONTEXT_TUPLE and type(parent) is SpanContext:
                trace_id, _, _, parent_flags, _, valid = parent  # the properties' values, no calls
            else:
                trace_id, parent_flags, valid = parent.trace_id, parent.trace_flags, parent.is_valid
        if parent is None or not valid:
            parent = None
            trace_id = root_trace_id if root_trace_id is not None else ids.generate_trace_id()
            random_trace_id = ids.is_trace_id_random()
        else:
            random_trace_id = parent_flags & RANDOM_TRACE_ID
        sampling = sampler.should_sample(context, trace_id, name, kind, attributes, links)
        decision = sampling.decision
        flags = (0x01 if decision is _RECORD_AND_SAMPLE else 0x00) | (0x02 if random_trace_id else 0x00)
        if span_id is None:
            span_id = ids.generate_span_id()
        trace_state = sampling.trace_state
        if SPAN_CONTEXT_TUPLE:  # SpanContext(trace_id, span_id, is_remote=False, ...), no constructor frame
            span_context = _new_tuple(
                SpanContext,
                (
                    trace_id,
                    span_id,
                    False,
                    _FLAGS[flags],
                    trace_state if trace_state is not None else DEFAULT_TRACE_STATE,
                    0 < trace_id <= _MAX_TRACE_ID and 0 < span_id <= _MAX_SPAN_ID,
                ),
            )
        else:
            span_context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=_FLAGS[flags], trace_state=trace_state)
        if decision is not _RECORD_AND_SAMPLE and decision is not _RECORD_ONLY:
            return trace_api.NonRecordingSpan(context=span_context)
        if processor is None:
            processor = self.span_processor
        if type(processor) is SynchronousMultiSpanProcessor:
            # The provider's list of one (pycrio's SwitchableSpanProcessor): that one, directly.
            only = processor._span_processors
            if len(only) == 1:
                processor = only[0]
        limits = self._span_limits
        # SpanAttributes(limits.max_span_attributes, ...) without its constructor: SpanLimits
        # has already refused negative limits.
        attributes_store = _new_object(SpanAttributes)
        attributes_store._dict = {}
        attributes_store.maxlen = limits.max_span_attributes
        attributes_store.max_value_len = limits.max_span_attribute_length
        if sampling.attributes:
            attributes_store._set_items(sampling.attributes)
        span = _new_object(LightSpan)
        span._name = name
        span._context = span_context
        span._kind = kind
        span._parent = parent
        span._resource = self.resource
        span._sampler = sampler
        span._span_processor = processor
        span._limits = limits
        span._instrumentation_scope = self._instrumentation_scope
        span._instrumentation_info = self.instrumentation_info
        span._lock = threading.Lock()
        span._attributes = attributes_store
        if not record_exception:
            span._record_exception = False
        if not set_status_on_exception:
            span._set_status_on_exception = False
        span._start_time = start_time if start_time is not None else time_ns()
        processor.on_start(span, parent_context=context)
        return span

    @property
    def light(self) -> bool:
        """Whether `start_span` makes LightSpans (and takes `sampler` and `processor`): not while
        the SDK's per-span internal metrics are on, nor when a tracer configurator disabled it."""
        return type(self._tracer_metrics) is NoOpTracerMetrics and self._tracer_config.is_enabled


class LightTracerProvider(TracerProvider):
    """The SDK's `TracerProvider` handing out `LightTracer`s (the global provider: step spans
    and the CRI interceptor get theirs from it), which share its `step_deferral`."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.step_deferral = StepDeferral()

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes = None,
    ) -> trace_api.Tracer:
        tracer = super().get_tracer(instrumenting_module_name, instrumenting_library_version, schema_url, attributes)
        if type(tracer) is Tracer:
            # The SDK made and cached it; it becomes a LightTracer in place (the same fields, only
            # start_span differs), so the SDK's cache and this tracer stay one object.
            tracer.__class__ = LightTracer
            tracer.step_deferral = self.step_deferral
        return tracer
