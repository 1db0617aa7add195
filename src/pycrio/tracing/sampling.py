"""Sampling: per-method root rates and error-biased keeping, composed from the SDK's samplers.

The provider's sampler is, from the outside in:

    ErrorKeepingSampler(                      # only with tracing_always_sample_errors
        ParentBased(root=MethodRateSampler(...)))

- `ParentBased` (the SDK's, as `CallSampler`: the same decisions, with the common answers made
  once) follows a caller's W3C decision, sampled or not; only calls without a parent reach the
  root sampler.
- `MethodRateSampler` picks, by span name (the full CRI method), the SDK sampler for that
  method's effective rate: `ALWAYS_OFF` at 0, `ALWAYS_ON` at 1000000, else `TraceIdRatioBased`.
- `ErrorKeepingSampler` turns a DROP for a SERVER span (one CRI call) into RECORD_ONLY, so the
  call's span is recorded without being sampled; `ErrorKeepingSpanProcessor` then hands such a span
  to the batch exporter only if it ended with status ERROR.

Trade-offs of keeping errors this way (the SDK decides sampling when a span starts, while the
status is only known when it ends):
- every call pays for a full recording span (attributes, log events), also the ones dropped;
- a kept error span is exported alone: it is not a sampled trace, its children inside pycrio are
  not recorded (they follow the unsampled parent), and its caller's span may not have been kept,
  so the trace is usually incomplete; its `pycrio.sampling.kept_for_error` attribute says so;
- error log records also set a span's status to ERROR, so such calls are kept too.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Mapping, Sequence

from opentelemetry.context import Context, get_current
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode, TraceFlags
from opentelemetry.trace import Span as APISpan
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.span import DEFAULT_TRACE_STATE, TraceState
from opentelemetry.util.types import Attributes

from pycrio.tracing.span_context import SAMPLED, SPAN_CONTEXT_TUPLE

MAX_RATE = 1_000_000
GLOB_CHARS = frozenset("*?[")
KEPT_FOR_ERROR = "pycrio.sampling.kept_for_error"
# Span names are CRI methods (a few dozen); beyond this many distinct names nothing more is cached.
MAX_CACHED_NAMES = 1024


class SamplingRules:
    """The effective root rate per method: `sampling_overrides` over the global rate.

    Precedence when several keys match a method: the exact full name
    (/runtime.v1.RuntimeService/Version), then the exact short name (Version), then the longest
    glob (fnmatch, case-sensitive, on the short or the full name; equally long globs: the
    lexically first). Results are cached per name.
    """

    def __init__(self, default_rate: int, overrides: Mapping[str, int] | None = None) -> None:
        self.default_rate = default_rate
        overrides = dict(overrides or {})
        self._exact = {k: v for k, v in overrides.items() if not GLOB_CHARS & set(k)}
        self._globs = sorted(
            ((k, v) for k, v in overrides.items() if GLOB_CHARS & set(k)), key=lambda kv: (-len(kv[0]), kv[0])
        )
        self._cache: dict[str, int] = {}

    def rate_for(self, method: str) -> int:
        rate = self._cache.get(method)
        if rate is None:
            rate = self._resolve(method)
            if len(self._cache) < MAX_CACHED_NAMES:
                self._cache[method] = rate
        return rate

    def _resolve(self, method: str) -> int:
        if method in self._exact:
            return self._exact[method]
        short = method.rpartition("/")[2]
        if short in self._exact:
            return self._exact[short]
        for pattern, rate in self._globs:
            if fnmatch.fnmatchcase(short, pattern) or fnmatch.fnmatchcase(method, pattern):
                return rate
        return self.default_rate

    @property
    def any_root_traces(self) -> bool:
        """Whether some method might start a trace of its own."""
        return self.default_rate > 0 or any(self._exact.values()) or any(rate for _, rate in self._globs)


def rate_sampler(rate_per_million: int) -> Sampler:
    """The SDK sampler for one rate."""
    if rate_per_million <= 0:
        return ALWAYS_OFF
    if rate_per_million >= MAX_RATE:
        return ALWAYS_ON
    return TraceIdRatioBased(rate_per_million / MAX_RATE)


class MethodRateSampler(Sampler):
    """Root sampler: delegates to the SDK sampler of the span's method (its name)."""

    def __init__(self, rules: SamplingRules) -> None:
        self.rules = rules
        self._by_rate: dict[int, Sampler] = {}
        self._by_name: dict[str, Sampler] = {}

    def sampler_for(self, name: str) -> Sampler:
        sampler = self._by_name.get(name)
        if sampler is None:
            rate = self.rules.rate_for(name)
            sampler = self._by_rate.get(rate)
            if sampler is None:
                sampler = self._by_rate[rate] = rate_sampler(rate)
            if len(self._by_name) < MAX_CACHED_NAMES:
                self._by_name[name] = sampler
        return sampler

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        return self.sampler_for(name).should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"MethodRateSampler{{default={self.rules.default_rate}/{MAX_RATE}}}"


class ErrorKeepingSampler(Sampler):
    """Wraps a sampler: a SERVER span it would drop is recorded (RECORD_ONLY) instead.

    Nothing is exported by this alone: the SDK's processors only export sampled spans;
    `ErrorKeepingSpanProcessor` decides at the end of the span.
    """

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        result = self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)
        if result.decision is Decision.DROP and kind is SpanKind.SERVER:
            return SamplingResult(Decision.RECORD_ONLY, attributes, result.trace_state)
        return result

    def get_description(self) -> str:
        return f"ErrorKeepingSampler{{{self.inner.get_description()}}}"


class ErrorKeepingSpanProcessor(SpanProcessor):
    """Wraps the batch processor: sampled spans pass; an unsampled (RECORD_ONLY) span passes
    only when it ended with status ERROR.

    The SDK's processors skip unsampled spans, so a kept error span is handed over as a copy whose
    context carries the sampled flag (OTLP does not transmit that flag) and the attribute
    `pycrio.sampling.kept_for_error = true`; the copy is made only for error spans.
    """

    def __init__(self, inner: SpanProcessor, on_kept: Callable[[], None] | None = None) -> None:
        self.inner = inner
        self._on_kept = on_kept

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is None:
            return
        if ctx.trace_flags & SAMPLED:
            self.inner.on_end(span)
        elif span.status.status_code is StatusCode.ERROR:
            if self._on_kept is not None:
                self._on_kept()
            self.inner.on_end(_as_kept(span))

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _as_kept(span: ReadableSpan) -> ReadableSpan:
    ctx = span.context
    assert ctx is not None
    context = SpanContext(
        ctx.trace_id, ctx.span_id, ctx.is_remote, TraceFlags(ctx.trace_flags | TraceFlags.SAMPLED), ctx.trace_state
    )
    return ReadableSpan(
        name=span.name,
        context=context,
        parent=span.parent,
        resource=span.resource,
        attributes={**(span.attributes or {}), KEPT_FOR_ERROR: True},
        events=span.events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class CallSampler(ParentBased):
    """`ParentBased(root=MethodRateSampler(rules))` with the SDK's default delegates, deciding as
    it does in one step, without a new SamplingResult per span where the answer cannot differ.

    Every span asks the sampler. The SDK's chain (ParentBased -> MethodRateSampler -> a
    StaticSampler) finds the parent span three times and builds a SamplingResult each time.
    Here, a root span of a method sampled at 0 or 1000000 per million, or a child of a parent
    without a tracestate, gets a shared result made once. It is the same decision, no
    attributes and the same trace state. Anything else (a ratio, a parent with a tracestate,
    sampler attributes) goes through the SDK's chain. `get_description` is ParentBased's.
    """

    def __init__(self, rules: SamplingRules) -> None:
        super().__init__(root=MethodRateSampler(rules))
        self._method_rates: MethodRateSampler = self._root  # type: ignore[assignment]
        self._root_results: dict[str, SamplingResult | None] = {}
        self._child_results = {
            (remote, sampled): _static_result(delegate, DEFAULT_TRACE_STATE)
            for (remote, sampled), delegate in {
                (True, True): self._remote_parent_sampled,
                (True, False): self._remote_parent_not_sampled,
                (False, True): self._local_parent_sampled,
                (False, False): self._local_parent_not_sampled,
            }.items()
        }

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if not attributes:
            span = (parent_context if parent_context is not None else get_current()).get(_SPAN_KEY)
            parent = span.get_span_context() if isinstance(span, APISpan) else None
            if parent is not None:
                if SPAN_CONTEXT_TUPLE and type(parent) is SpanContext:
                    _, _, remote, flags, state, valid = parent  # the properties' values, no calls
                else:
                    remote, flags, state, valid = parent.is_remote, parent.trace_flags, parent.trace_state, parent.is_valid
            if parent is None or not valid:
                result = self._root_results.get(name, _UNKNOWN)
                if result is _UNKNOWN:
                    result = _static_result(self._method_rates.sampler_for(name))
                    if len(self._root_results) < MAX_CACHED_NAMES:
                        self._root_results[name] = result
                if result is not None:
                    return result
            elif state is DEFAULT_TRACE_STATE or not state:
                result = self._child_results[(remote, bool(flags & SAMPLED))]
                if result is not None:
                    return result if state is DEFAULT_TRACE_STATE else _with_state(result, parent)
        return super().should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)


_UNKNOWN = SamplingResult(Decision.DROP)  # a marker: "not cached yet"


def _static_result(sampler: Sampler, trace_state: TraceState | None = None) -> SamplingResult | None:
    """The one result a StaticSampler (ALWAYS_ON, ALWAYS_OFF) gives for a span without
    attributes whose parent has `trace_state` (None: no parent); None for any other sampler."""
    if type(sampler) is not StaticSampler:
        return None
    return SamplingResult(sampler._decision, None, trace_state)


def _with_state(result: SamplingResult, parent: SpanContext) -> SamplingResult:
    return SamplingResult(result.decision, None, parent.trace_state)


def make_sampler(rules: SamplingRules, always_sample_errors: bool = False) -> Sampler:
    """ParentBased(MethodRateSampler) (as CallSampler), wrapped to record dropped calls when
    errors are kept."""
    sampler: Sampler = CallSampler(rules)
    return ErrorKeepingSampler(sampler) if always_sample_errors else sampler
