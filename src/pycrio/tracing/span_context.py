"""What hot span paths may assume of the API's SpanContext and TraceFlags (API only, no SDK).

A SpanContext is a tuple subclass whose properties read its fields; in the pinned API it is the
tuple (trace_id, span_id, is_remote, trace_flags, trace_state, is_valid). Where
`SPAN_CONTEXT_TUPLE` holds, the interceptor, tracer and sampler read a SpanContext by unpacking
it and make one with `tuple.__new__` (the same fields and validity) instead of calling its five
properties or its keyword-argument constructor; otherwise they take the properties and the
constructor: slower, not wrong.
"""

from __future__ import annotations

from opentelemetry.trace import SpanContext, TraceFlags
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

SAMPLED = TraceFlags.SAMPLED  # `flags & SAMPLED` is `flags.sampled` without its property call
RANDOM_TRACE_ID = TraceFlags.RANDOM_TRACE_ID


def _span_context_is_tuple() -> bool:
    """Whether SpanContext(...) holds exactly the fields its properties return, in that order."""
    probe = SpanContext(1, 2, True, TraceFlags(3), DEFAULT_TRACE_STATE)
    try:
        fields = tuple(probe)
    except TypeError:
        return False
    return len(fields) == 6 and fields == (
        probe.trace_id, probe.span_id, probe.is_remote, probe.trace_flags, probe.trace_state, probe.is_valid
    )


SPAN_CONTEXT_TUPLE = _span_context_is_tuple()
