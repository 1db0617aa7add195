"""PodSandboxStats, ListPodSandboxStats and StreamPodSandboxStats (usage arrives with the runtime)."""

from __future__ import annotations

from typing import Iterator

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon
from pycrio.server.streaming_list import chunks
from pycrio.state.records import SandboxRecord


def _stats(pod: SandboxRecord) -> api_pb2.PodSandboxStats:
    config = pod.pod_config
    return api_pb2.PodSandboxStats(
        attributes=api_pb2.PodSandboxAttributes(
            id=pod.id, metadata=config.metadata, labels=config.labels, annotations=config.annotations
        )
    )


def _matching(daemon: Daemon, flt: api_pb2.PodSandboxStatsFilter) -> list[api_pb2.PodSandboxStats]:
    return [_stats(p) for p in daemon.state.list_pods(id_prefix=flt.id, labels=dict(flt.label_selector))]


def pod_sandbox_stats(daemon: Daemon, request: api_pb2.PodSandboxStatsRequest) -> api_pb2.PodSandboxStatsResponse:
    return api_pb2.PodSandboxStatsResponse(stats=_stats(daemon.state.get_pod(request.pod_sandbox_id)))


def list_pod_sandbox_stats(
    daemon: Daemon, request: api_pb2.ListPodSandboxStatsRequest
) -> api_pb2.ListPodSandboxStatsResponse:
    return api_pb2.ListPodSandboxStatsResponse(stats=_matching(daemon, request.filter))


def stream_pod_sandbox_stats(
    daemon: Daemon, request: api_pb2.StreamPodSandboxStatsRequest
) -> Iterator[api_pb2.StreamPodSandboxStatsResponse]:
    for chunk in chunks(_matching(daemon, request.filter)):
        yield api_pb2.StreamPodSandboxStatsResponse(pod_sandbox_stats=chunk)
