"""ListMetricDescriptors, ListPodSandboxMetrics, StreamPodSandboxMetrics: cAdvisor-named metrics of the
ready pods and their running containers, for kubelet's CRI metrics (see pycrio.pods.pod_metrics)."""

from __future__ import annotations

from typing import Iterator

from pycrio.cri import api_pb2
from pycrio.pods import pod_metrics
from pycrio.server.daemon import Daemon
from pycrio.server.streaming_list import chunks


def _collector(daemon: Daemon) -> pod_metrics.PodMetricsCollector:
    return pod_metrics.PodMetricsCollector(daemon.state, daemon.containers, daemon.images.containers_dir)


def list_metric_descriptors(
    daemon: Daemon, request: api_pb2.ListMetricDescriptorsRequest
) -> api_pb2.ListMetricDescriptorsResponse:
    return api_pb2.ListMetricDescriptorsResponse(descriptors=pod_metrics.descriptors())


def list_pod_sandbox_metrics(
    daemon: Daemon, request: api_pb2.ListPodSandboxMetricsRequest
) -> api_pb2.ListPodSandboxMetricsResponse:
    return api_pb2.ListPodSandboxMetricsResponse(pod_metrics=_collector(daemon).collect())


def stream_pod_sandbox_metrics(
    daemon: Daemon, request: api_pb2.StreamPodSandboxMetricsRequest
) -> Iterator[api_pb2.StreamPodSandboxMetricsResponse]:
    for chunk in chunks(_collector(daemon).collect()):
        yield api_pb2.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=chunk)
