"""The Prometheus text endpoint: an OpenTelemetry PrometheusMetricReader served by prometheus_client."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import Metric

log = logging.getLogger("pycrio.metrics")


class MetricsError(Exception):
    """The metrics pipeline cannot start (e.g. the Prometheus port is taken); one-line message."""


class _SerializedCollector:
    """Collects the reader's private registry one scrape at a time.

    The reader's collector hands SDK results from its callback to its generator through a shared
    deque, so two concurrent scrapes can steal each other's data: one then answers with duplicated
    series and the other with none. A lock around the whole collection keeps every scrape whole.
    """

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            return list(self._source.collect())


def format_http_address(host: str, port: int) -> str:
    """host:port for a URL, bracketing IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PrometheusEndpoint:
    """A PrometheusMetricReader (give `reader` to the MeterProvider) and the HTTP server that serves it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader_registry = CollectorRegistry()
        # Exact names and labels: no target_info series and no otel_scope_* labels on every series.
        self.reader = PrometheusMetricReader(
            disable_target_info=True, scope_info_enabled=False, registry=self._reader_registry
        )
        # A dedicated registry: only pycrio's series, and no clash with another reader in the process.
        self.registry = CollectorRegistry()
        self.registry.register(_SerializedCollector(self._reader_registry))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{format_http_address(self.host, self.port)}/metrics"

    def start(self) -> None:
        """Serve http://host:port/metrics; MetricsError when the address cannot be bound."""
        try:
            self._server, self._thread = start_http_server(self.port, self.host, registry=self.registry)
        except OSError as e:
            reason = e.strerror or str(e)
            raise MetricsError(
                f"cannot serve Prometheus metrics on {format_http_address(self.host, self.port)}: {reason}"
            ) from None
        self._thread.name = "pycrio-metrics-http"
        log.debug("serving Prometheus metrics on %s", self.url)

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
