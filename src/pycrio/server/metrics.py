"""ListMetricDescriptors, ListPodSandboxMetrics, StreamPodSandboxMetrics: no pod metrics are
collected yet, so there are no descriptors and, for every pod, nothing to report."""

from __future__ import annotations

from typing import Iterator

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def list_metric_descriptors(
    daemon: Daemon, request: api_pb2.ListMetricDescriptorsRequest
) -> api_pb2.ListMetricDescriptorsResponse:
    return api_pb2.ListMetricDescriptorsResponse()


def list_pod_sandbox_metrics(
    daemon: Daemon, request: api_pb2.ListPodSandboxMetricsRequest
) -> api_pb2.ListPodSandboxMetricsResponse:
    return api_pb2.ListPodSandboxMetricsResponse()


def stream_pod_sandbox_metrics(
    daemon: Daemon, request: api_pb2.StreamPodSandboxMetricsRequest
) -> Iterator[api_pb2.StreamPodSandboxMetricsResponse]:
    return iter(())
