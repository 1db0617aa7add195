"""The SDK's OTLP/gRPC span exporter, sending `SpanEncoder`'s bytes instead of upb messages.

Everything else is the SDK's: the channel and its options, headers, compression, timeout
(OTEL_EXPORTER_OTLP_*), retries with backoff, the channel re-made after UNAVAILABLE, and its
log lines (which `ExportHealth` summarises). Only `_translate_data` changes: it returns the
request's bytes, which a stub without a request serializer sends as they are.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan

from pycrio.tracing.otlp_encode import SpanEncoder, Unsupported, sdk_encode

log = logging.getLogger("pycrio.tracing")

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
            encoded = self._encoder.encode_request(data)
        except Unsupported as exc:
            self._fallbacks += 1
            if self._fallbacks == 1:
                log.info("tracing: a batch holds what pycrio's encoder does not write (%s): the SDK encodes it", exc)
            encoded = sdk_encode(data)
        self._encoded = (data, encoded)
        return encoded

    def export(self, spans: Sequence[ReadableSpan]) -> Any:
        try:
            return super().export(spans)
        finally:
            self._encoded = (None, b"")
