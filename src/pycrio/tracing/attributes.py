"""Attributes (and events) of plain values onto SDK spans without the SDK cleaning each one again.

The SDK's `set_attribute(s)` and `start_span(attributes=...)` pass every value through
`BoundedAttributes`: a lock and a recursive cleaning call per value (about 7000 instructions per
attribute here, a third of what a CRI call span costs the request thread). A `str`, `int`, `float`
or `bool` needs no cleaning, so such values go straight into the span's attribute dict, as long as
no limit could apply (the count stays within OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT, no value length
limit is set) and the span is still open. Anything else takes the SDK's own path. The same for
the attributes of an event (a log record on its call's span).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from opentelemetry.trace import Span

PLAIN_TYPES = frozenset((str, int, float, bool))


def put_attributes(span: Span, attributes: Mapping[str, Any], plain: bool = False) -> None:
    """Set `attributes` (non-empty str keys) on `span`; `plain=True` when the caller knows every
    value is a str/int/float/bool, which skips the type check."""
    try:
        store = span._attributes  # type: ignore[attr-defined] # the SDK span's BoundedAttributes
        values = store._dict
        direct = (
            type(values) is dict
            and store.max_value_len is None
            and not store._immutable  # ended: the SDK's path warns
            and (store.maxlen is None or len(values) + len(attributes) <= store.maxlen)
        )
    except AttributeError:  # not an SDK span (or its internals changed)
        direct = False
    if direct and (plain or all(type(v) in PLAIN_TYPES for v in attributes.values())):
        values.update(attributes)
    else:
        span.set_attributes(attributes)


def add_plain_event(span: Span, name: str, attributes: dict[str, Any], timestamp: int | None = None) -> None:
    """`span.add_event(name, attributes, timestamp)` for str/int/float/bool values, when no limit could apply:
    the event's attributes are `attributes` itself behind a read-only MappingProxyType (the caller
    hands the dict over and does not change it), without the cleaning pass and without a
    BoundedAttributes (its lock and fields: about 200 bytes per event kept until export)."""
    try:
        limits = span._limits  # type: ignore[attr-defined] # the SDK span's SpanLimits
        add = span._add_event  # type: ignore[attr-defined] # appends under the span's lock, unless ended
        maxlen = limits.max_event_attributes
        direct = limits.max_attribute_length is None and (maxlen is None or len(attributes) <= maxlen)
    except AttributeError:  # not an SDK span (or its internals changed)
        direct = False
    if not direct or not all(type(v) in PLAIN_TYPES for v in attributes.values()):
        span.add_event(name, attributes, timestamp)
        return
    add(_event_class()(name, MappingProxyType(attributes), timestamp))


_EVENT: type | None = None


def _event_class() -> type:
    """The SDK's Event, imported on first use: pycrio-monitor with tracing off imports
    pycrio.tracing (step_span) without the SDK; a span that gets events is the SDK's."""
    global _EVENT
    if _EVENT is None:
        from opentelemetry.sdk.trace import Event

        _EVENT = Event
    return _EVENT
