"""ContainerStats, ListContainerStats and StreamContainerStats: cgroup counters (CPU with its rate
since the container's last sample, memory with page faults and what is left under the limit, swap
where it is accounted) and the writable layer."""

from __future__ import annotations

from typing import Iterator

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon
from pycrio.server.stats_convert import cpu_usage, directory_usage, memory_usage, now, swap_usage
from pycrio.server.streaming_list import chunks
from pycrio.state.records import CONTAINER_RUNNING, ContainerRecord


def container_stats_of(daemon: Daemon, container: ContainerRecord) -> api_pb2.ContainerStats:
    listed = container.to_cri()  # built once per record: no config decoded per poll
    stats = api_pb2.ContainerStats(
        attributes=api_pb2.ContainerAttributes(
            id=container.id, metadata=listed.metadata, labels=listed.labels, annotations=listed.annotations
        )
    )
    timestamp = now()
    counters = daemon.containers.stats(container) if container.state == CONTAINER_RUNNING else None
    if counters is not None:
        stats.cpu.CopyFrom(cpu_usage(counters, timestamp, key=container.id))
        stats.memory.CopyFrom(memory_usage(counters, timestamp))
        swap = swap_usage(counters, timestamp)
        if swap is not None:
            stats.swap.CopyFrom(swap)
    upper = daemon.images.containers_dir / container.id / "upper"
    if upper.exists():
        stats.writable_layer.CopyFrom(directory_usage(upper, str(daemon.images.directory), timestamp))
    return stats


def _matching(daemon: Daemon, flt: api_pb2.ContainerStatsFilter) -> list[api_pb2.ContainerStats]:
    containers = daemon.state.list_containers(
        id_prefix=flt.id, pod_id_prefix=flt.pod_sandbox_id, labels=dict(flt.label_selector)
    )
    # As ListContainers: the records are current (exits arrive as events), so a list of stats asks
    # the runtime nothing; a container that exited meanwhile has no cgroup left and gets no counters.
    return [container_stats_of(daemon, c) for c in containers]


def container_stats(daemon: Daemon, request: api_pb2.ContainerStatsRequest) -> api_pb2.ContainerStatsResponse:
    container = daemon.containers.refresh(daemon.state.get_container(request.container_id))
    return api_pb2.ContainerStatsResponse(stats=container_stats_of(daemon, container))


def list_container_stats(
    daemon: Daemon, request: api_pb2.ListContainerStatsRequest
) -> api_pb2.ListContainerStatsResponse:
    return api_pb2.ListContainerStatsResponse(stats=_matching(daemon, request.filter))


def stream_container_stats(
    daemon: Daemon, request: api_pb2.StreamContainerStatsRequest
) -> Iterator[api_pb2.StreamContainerStatsResponse]:
    for chunk in chunks(_matching(daemon, request.filter)):
        yield api_pb2.StreamContainerStatsResponse(container_stats=chunk)
