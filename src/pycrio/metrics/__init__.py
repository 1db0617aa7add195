"""Per CRI method metrics: OTLP/gRPC push and a Prometheus text endpoint (see provider.py)."""

from pycrio.metrics.prometheus import MetricsError
from pycrio.metrics.provider import CRIMetrics

__all__ = ["CRIMetrics", "MetricsError"]
