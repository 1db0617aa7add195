"""PodSandboxStats, ListPodSandboxStats and StreamPodSandboxStats: the pod cgroup (CPU with its rate
since the pod's last sample, memory) and its containers."""

from __future__ import annotations

from typing import Iterator

from pycrio.cri import api_pb2
from pycrio.oci import cgroups
from pycrio.server.container_stats import container_stats_of
from pycrio.server.daemon import Daemon
from pycrio.server.stats_convert import cpu_usage, memory_usage, now
from pycrio.server.streaming_list import chunks
from pycrio.state.records import SandboxRecord


def _stats(daemon: Daemon, pod: SandboxRecord) -> api_pb2.PodSandboxStats:
    config = pod.pod_config
    stats = api_pb2.PodSandboxStats(
        attributes=api_pb2.PodSandboxAttributes(
            id=pod.id, metadata=config.metadata, labels=config.labels, annotations=config.annotations
        )
    )
    timestamp = now()
    counters = cgroups.read_stats(cgroups.cgroups_path(pod.cgroup_parent, pod.id, None))
    if counters is not None:
        stats.linux.cpu.CopyFrom(cpu_usage(counters, timestamp, key=pod.id))
        stats.linux.memory.CopyFrom(memory_usage(counters, timestamp))
        stats.linux.process.CopyFrom(
            api_pb2.ProcessUsage(timestamp=timestamp, process_count=api_pb2.UInt64Value(value=counters.pids))
        )
    stats.linux.containers.extend(
        container_stats_of(daemon, c) for c in daemon.state.containers_of(pod.id)  # current: see container_stats
    )
    return stats


def _matching(daemon: Daemon, flt: api_pb2.PodSandboxStatsFilter) -> list[api_pb2.PodSandboxStats]:
    return [_stats(daemon, p) for p in daemon.state.list_pods(id_prefix=flt.id, labels=dict(flt.label_selector))]


def pod_sandbox_stats(daemon: Daemon, request: api_pb2.PodSandboxStatsRequest) -> api_pb2.PodSandboxStatsResponse:
    return api_pb2.PodSandboxStatsResponse(stats=_stats(daemon, daemon.state.get_pod(request.pod_sandbox_id)))


def list_pod_sandbox_stats(
    daemon: Daemon, request: api_pb2.ListPodSandboxStatsRequest
) -> api_pb2.ListPodSandboxStatsResponse:
    return api_pb2.ListPodSandboxStatsResponse(stats=_matching(daemon, request.filter))


def stream_pod_sandbox_stats(
    daemon: Daemon, request: api_pb2.StreamPodSandboxStatsRequest
) -> Iterator[api_pb2.StreamPodSandboxStatsResponse]:
    for chunk in chunks(_matching(daemon, request.filter)):
        yield api_pb2.StreamPodSandboxStatsResponse(pod_sandbox_stats=chunk)
