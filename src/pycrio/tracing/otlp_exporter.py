"""The SDK's OTLP/gRPC span exporter, sending `SpanEncoder`'s bytes instead of upb messages.

Everything else is the SDK's: the channel and its options, headers, compression, timeout
(OTEL_EXPORTER_OTLP_*), retries with backoff, the channel re-made after UNAVAILABLE, and its
log lines (which `ExportHealth` summarises). Only `_translate_data` changes: it returns the
request's bytes, which a stub without a request serializer sends as they are. A `SpanBatch`'s
relayed, already encoded spans (pycrio-monitors', pycrio.tracing.relay) are appended to them:
protobuf concatenation appends their ResourceSpans to the request's.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan

from pycrio.tracing.exporter import SpanBatch, span_count, yield_gil
from pycrio.tracing.otlp_encode import SpanEncoder, Unsupported, sdk_encode

log = logging.getLogger("pycrio.tracing")

# The export thread shares the GIL with the CRI calls: it encodes PAUSE_EVERY spans (100-300 µs),
# then pauses (exporter.yield_gil) so a call thread waiting for the GIL gets it. Without this, a
# call waits up to the whole batch (several ms at 512 spans, bench/span_export.py's GIL probe: p99
# 12-19 ms late vs 1.7-1.9 ms with it, idle 1.9-2.6).
PAUSE_EVERY = 32


EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class RawTraceServiceStub:
    """TraceService client whose Export takes the serialized request (bytes)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.Export = channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=None,  # the request is already bytes
            response_deserializer=ExportTraceServiceResponse.FromString,
            _registered_method=True,
        )


class FastOTLPSpanExporter(OTLPSpanExporter):
    """OTLPSpanExporter with pycrio's encoder; a batch it cannot encode goes through the SDK's."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._encoder = SpanEncoder()
        self._encoded: tuple[Sequence[ReadableSpan] | None, bytes] = (None, b"")
        self._fallbacks = 0
        # Also used when the SDK re-makes the channel after an UNAVAILABLE error.
        self._stub = RawTraceServiceStub  # type: ignore[assignment]
        self._client = RawTraceServiceStub(self._channel)  # type: ignore[assignment]

    def _translate_data(self, data: Sequence[ReadableSpan]) -> bytes:  # type: ignore[override]
        # The SDK translates again on every retry of the same batch: encode it once.
        batch, encoded = self._encoded
        if batch is data:
            return encoded
        try:
            encoded = self._encoder.encode_request(data, yield_gil, PAUSE_EVERY)
        except Unsupported as exc:
            self._fallbacks += 1
            if self._fallbacks == 1:
                log.info("tracing: a batch holds what pycrio's encoder does not write (%s): the SDK encodes it", exc)
            encoded = sdk_encode(data)
        if isinstance(data, SpanBatch):
            encoded += data.encoded
        self._encoded = (data, encoded)
        return encoded

    def export(self, spans: Sequence[ReadableSpan]) -> Any:
        try:
            return super().export(spans)
        finally:
            self._encoded = (None, b"")

    def _count_data(self, data: Sequence[ReadableSpan]) -> int:
        return span_count(data)


class SdkOTLPSpanExporter(OTLPSpanExporter):
    """The SDK's exporter and encoder (PYCRIO_TRACING_ENCODER=sdk), with relayed spans merged in."""

    def _translate_data(self, data: Sequence[ReadableSpan]) -> Any:
        request = super()._translate_data(data)
        if isinstance(data, SpanBatch):
            request.MergeFromString(data.encoded)
        return request

    def _count_data(self, data: Sequence[ReadableSpan]) -> int:
        return span_count(data)
