"""OTLP ExportTraceServiceRequest bytes straight from SDK spans, without protobuf objects.

The SDK's `encode_spans(spans).SerializeToString()` builds one upb message per span, attribute,
key and value (about 40 µs per CRI call span, 80-120 µs with a `log` event, measured with
bench/span_export.py); this module writes the same protobuf wire format with bytes joins and
cached key/resource/scope encodings (a few µs per span). The output is byte-for-byte the SDK's
(tests/test_export_process.py checks it on every kind of value, events, links, trace state,
status, several resources and scopes). Anything this encoder does not know how to write exactly
like the SDK (a value type outside OTLP's, an int beyond int64, a string that is not UTF-8) makes
`encode_request` raise `Unsupported`; the caller then uses the SDK's encoder for that batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from struct import Struct
from typing import Any

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.span import TraceState

from pycrio.tracing.span import LightSpan, SpanAttributes

_FIXED64 = Struct("<Q").pack
_DOUBLE = Struct("<d").pack
_FIXED32 = Struct("<I").pack
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64 = (1 << 64) - 1
_UINT32_MAX = (1 << 32) - 1

# SpanFlags: the span's parent context says whether it is remote (OTLP 1.1).
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_FLAGS_LOCAL = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE)  # Span.flags, field 16, fixed32
_FLAGS_REMOTE = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE | _IS_REMOTE)
_LINK_FLAGS_LOCAL = b"\x35" + _FIXED32(_HAS_IS_REMOTE)  # Span.Link.flags, field 6
_LINK_FLAGS_REMOTE = b"\x35" + _FIXED32(_HAS_IS_REMOTE | _IS_REMOTE)
_EMPTY_STATUS = b"\x7a\x00"  # the SDK always sets Span.status, empty when UNSET without description

_CACHE_LIMIT = 4096  # distinct keys, resources, scopes remembered (a few dozen in practice)
_VALUES_PER_KEY = 64  # distinct values remembered per key; beyond, the key's values vary per span


class Unsupported(Exception):
    """A span holds something this encoder does not write exactly as the SDK does."""


def _varint_slow(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [_varint_slow(n) for n in range(1 << 14)]


def _varint(n: int) -> bytes:
    """Unsigned varint (lengths, counts, enums)."""
    if n < 16384:
        return _SMALL[n]
    return _varint_slow(n)


def _int64(n: int) -> bytes:
    """An int64 field's varint: negative values as their 64-bit two's complement."""
    if 0 <= n < 16384:
        return _SMALL[n]
    if n < _INT64_MIN or n > _INT64_MAX:
        raise Unsupported(f"int {n} does not fit int64")
    return _varint_slow(n & _UINT64)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 16384 else _varint_slow(n)) + payload


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates: upb refuses them, the SDK logs and skips
        raise Unsupported(str(exc)) from None


def _any_value(value: Any) -> bytes:
    """AnyValue, following the SDK's `_encode_value` type order (bool before int, str before
    Sequence)."""
    t = type(value)
    if t is str:
        return _field(b"\x0a", _utf8(value))
    if t is int:
        return b"\x18" + _int64(value)
    if t is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if t is float:
        return b"\x21" + _DOUBLE(value)
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", _utf8(str.__str__(value)))
    if isinstance(value, int):
        return b"\x18" + _int64(int(value))
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(float(value))
    if isinstance(value, bytes):
        return _field(b"\x3a", bytes(value))
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join([_field(b"\x0a", _any_value(v)) for v in value]))
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join([_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()]))
    raise Unsupported(f"attribute value of type {t.__name__}")


def _key_value(key: str, value: Any) -> bytes:
    return (_field(b"\x0a", _utf8(key)) if key else b"") + _field(b"\x12", _any_value(value))


class _Keys:
    """Encoded attributes of one field (span, event, link, resource or scope attributes): each
    key's bytes, and for a key whose str/int values repeat (rpc.method, code.lineno...) its whole
    KeyValue field per value. A key with many distinct values (the request id) stops being
    remembered by value after `_VALUES_PER_KEY`."""

    __slots__ = ("tag", "keys")

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        # key -> [encoded key field, {value: encoded KeyValue field} or None]
        self.keys: dict[str, list[Any]] = {}

    def encode(self, attributes: Mapping[str, Any] | None) -> list[bytes]:
        """Each attribute as a repeated KeyValue field."""
        if not attributes:
            return []
        out = []
        keys = self.keys
        tag = self.tag
        # BoundedAttributes' own items() goes through Python-level __iter__/__getitem__.
        items = attributes._dict.items() if type(attributes) in _BOUNDED else attributes.items()
        for key, value in items:
            entry = keys.get(key)
            if entry is None:
                entry = [_field(b"\x0a", _utf8(key)) if key else b"", {}]
                if len(keys) < _CACHE_LIMIT:
                    keys[key] = entry
            values = entry[1]
            t = type(value)
            if values is not None and (t is str or t is int):
                encoded = values.get(value)
                if encoded is None:
                    encoded = _field(tag, entry[0] + _field(b"\x12", _any_value(value)))
                    if len(values) < _VALUES_PER_KEY:
                        values[value] = encoded
                    else:
                        entry[1] = None
                out.append(encoded)
            else:
                out.append(_field(tag, entry[0] + _field(b"\x12", _any_value(value))))
        return out


class SpanEncoder:
    """Encodes batches of finished SDK spans as ExportTraceServiceRequest bytes.

    One per export thread: its caches (keys, resources, scopes) are not locked.
    """

    def __init__(self) -> None:
        self._span_attributes = _Keys(b"\x4a")  # Span.attributes, field 9
        self._event_attributes = _Keys(b"\x1a")  # Span.Event.attributes, field 3
        self._link_attributes = _Keys(b"\x22")  # Span.Link.attributes, field 4
        # id() -> (object, encoded): the object is kept so its id cannot be reused.
        self._resources: dict[int, tuple[Resource, bytes]] = {}
        self._scopes: dict[int, tuple[InstrumentationScope | None, bytes]] = {}

    # -- the request ---------------------------------------------------------------------------
    def encode_request(
        self, spans: Sequence[ReadableSpan], pause: Callable[[], None] | None = None, pause_every: int = 32
    ) -> bytes:
        """ExportTraceServiceRequest bytes, identical to the SDK's encoder; raises Unsupported.

        `pause`, when given, is called after every `pause_every` spans (to let other threads run).
        """
        # Resource -> scope -> spans in first-seen order, grouped as the SDK's dicts group them.
        groups: list[tuple[Resource, list[tuple[InstrumentationScope | None, list[bytes]]]]] = []
        by_ids: dict[tuple[int, int], list[bytes]] = {}
        last: tuple[int, int] = (-1, -1)
        current: list[bytes] = []
        span_field = self._span
        for i, span in enumerate(spans):
            if pause is not None and i and not i % pause_every:
                pause()
            resource = span.resource
            scope = span.instrumentation_scope or None
            ids = (id(resource), id(scope))
            if ids != last:
                found = by_ids.get(ids)
                if found is None:
                    found = by_ids[ids] = _group(groups, resource, scope)
                current = found
                last = ids
            current.append(span_field(span))
        out = []
        for resource, scopes in groups:
            scope_spans = [
                _field(b"\x12", self._scope(scope) + b"".join(encoded) + _schema_url(scope))
                for scope, encoded in scopes
            ]
            body = self._resource(resource) + b"".join(scope_spans)
            if resource.schema_url:
                body += _field(b"\x1a", _utf8(resource.schema_url))
            out.append(_field(b"\x0a", body))
        return b"".join(out)

    def _resource(self, resource: Resource) -> bytes:
        """ResourceSpans.resource (field 1)."""
        cached = self._resources.get(id(resource))
        if cached is not None and cached[0] is resource:
            return cached[1]
        encoded = _field(b"\x0a", b"".join(_Keys(b"\x0a").encode(resource.attributes)))
        if len(self._resources) < _CACHE_LIMIT:
            self._resources[id(resource)] = (resource, encoded)
        return encoded

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        """ScopeSpans.scope (field 1)."""
        cached = self._scopes.get(id(scope))
        if cached is not None and cached[0] is scope:
            return cached[1]
        body = b""
        if scope is not None:
            if scope.name:
                body += _field(b"\x0a", _utf8(scope.name))
            if scope.version:
                body += _field(b"\x12", _utf8(scope.version))
            body += b"".join(_Keys(b"\x1a").encode(scope.attributes))
        encoded = _field(b"\x0a", body)
        if len(self._scopes) < _CACHE_LIMIT:
            self._scopes[id(scope)] = (scope, encoded)
        return encoded

    # -- one span -------------------------------------------------------------------------------
    def _span(self, span: ReadableSpan) -> bytes:
        """ScopeSpans.spans (field 2): one Span message."""
        if type(span) in _SDK_SPANS:
            # The SDK's own fields, read without its per-access copies (MappingProxyType, tuple()).
            ctx = span._context
            parent = span._parent
            name = span._name
            kind = span._kind
            start = span._start_time
            end = span._end_time
            attributes = span._attributes
            events = span._events
            links = span._links
            status = span._status
            dropped_attributes = getattr(attributes, "dropped", 0)
            if type(span) is LightSpan:  # plain lists: the span counts its own drops
                dropped_events = span._dropped_events
                dropped_links = span._dropped_links
            else:
                dropped_events = getattr(events, "dropped", 0)
                dropped_links = getattr(links, "dropped", 0)
            if type(events) is BoundedList:  # its __len__/__iter__ are Python code; its deque is not
                events = events._dq
            if type(links) is BoundedList:
                links = links._dq
        else:
            ctx = span.context
            parent = span.parent
            name = span.name
            kind = span.kind
            start = span.start_time
            end = span.end_time
            attributes = span.attributes
            events = span.events
            links = span.links
            status = span.status
            dropped_attributes = span.dropped_attributes
            dropped_events = span.dropped_events
            dropped_links = span.dropped_links
        head = b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big") + b"\x12\x08" + ctx.span_id.to_bytes(8, "big")
        trace_state = ctx.trace_state
        if trace_state is not None and (trace_state._dict if type(trace_state) is TraceState else trace_state):
            text = ",".join([f"{key}={value}" for key, value in trace_state.items()])
            if text:
                head += _field(b"\x1a", _utf8(text))
        if parent:
            head += b"\x22\x08" + parent.span_id.to_bytes(8, "big")
        if name:
            head += _field(b"\x2a", _utf8(name))
        head += _KINDS[kind._value_]
        if start:
            head += b"\x39" + _FIXED64(start)
        if end:
            head += b"\x41" + _FIXED64(end)
        parts = self._span_attributes.encode(attributes)
        parts.insert(0, head)
        if dropped_attributes:
            parts.append(b"\x50" + _varint(dropped_attributes))
        if events:
            encode = self._event_attributes.encode
            for event in events:
                timestamp = event.timestamp
                body = b"\x09" + _FIXED64(timestamp) if timestamp else b""
                if event.name:
                    body += _field(b"\x12", _utf8(event.name))
                event_attributes = event.attributes
                body += b"".join(encode(event_attributes))
                dropped = getattr(event_attributes, "dropped", 0)
                if dropped:
                    body += b"\x20" + _varint(dropped)
                parts.append(_field(b"\x5a", body))
        if dropped_events:
            parts.append(b"\x60" + _varint(dropped_events))
        if links:
            encode = self._link_attributes.encode
            for link in links:
                lctx = link.context
                body = b"\x0a\x10" + lctx.trace_id.to_bytes(16, "big") + b"\x12\x08" + lctx.span_id.to_bytes(8, "big")
                link_attributes = link.attributes
                body += b"".join(encode(link_attributes))
                dropped = getattr(link_attributes, "dropped", 0)
                if dropped:
                    body += b"\x28" + _varint(dropped)
                body += _LINK_FLAGS_REMOTE if lctx.is_remote else _LINK_FLAGS_LOCAL
                parts.append(_field(b"\x6a", body))
        if dropped_links:
            parts.append(b"\x70" + _varint(dropped_links))
        if status is not None:
            code = status.status_code
            description = status.description
            if code is _UNSET and not description:
                parts.append(_EMPTY_STATUS)
            else:
                body = _field(b"\x12", _utf8(description)) if description else b""
                if code is not _UNSET:
                    body += b"\x18" + _varint(code._value_)
                parts.append(_field(b"\x7a", body))
        parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
        return _field(b"\x12", b"".join(parts))


def _same_key(a: Any, b: Any) -> bool:
    """Whether a dict would take `a` and `b` for one key (the SDK groups by dict keys)."""
    return a is b or (hash(a) == hash(b) and a == b)


def _group(
    groups: list[tuple[Resource, list[tuple[InstrumentationScope | None, list[bytes]]]]],
    resource: Resource,
    scope: InstrumentationScope | None,
) -> list[bytes]:
    """The list collecting the encoded spans of (resource, scope), added to `groups` if new."""
    for known, scopes in groups:
        if _same_key(known, resource):
            break
    else:
        scopes = []
        groups.append((resource, scopes))
    for known_scope, encoded in scopes:
        if _same_key(known_scope, scope):
            return encoded
    encoded = []
    scopes.append((scope, encoded))
    return encoded


def _schema_url(scope: InstrumentationScope | None) -> bytes:
    url = scope.schema_url if scope is not None else None
    return _field(b"\x1a", _utf8(url)) if url else b""


# By SpanKind value: SpanKind.INTERNAL (0) is SPAN_KIND_INTERNAL (1) on the wire, and so on.
_KINDS = {kind.value: b"\x30" + _varint(kind.value + 1) for kind in SpanKind}
_UNSET = StatusCode.UNSET
_SDK_SPANS = frozenset((ReadableSpan, Span, LightSpan))
_BOUNDED = frozenset((BoundedAttributes, SpanAttributes))  # their own items() is Python code


def sdk_encode(spans: Sequence[ReadableSpan]) -> bytes:
    """The SDK's encoding (the reference, and the fallback for what `SpanEncoder` refuses)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    return encode_spans(spans).SerializeToString()


__all__ = ["SpanEncoder", "Unsupported", "sdk_encode"]
