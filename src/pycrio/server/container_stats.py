"""ContainerStats, ListContainerStats and StreamContainerStats.

Usage numbers (cgroups) arrive with the runtime issue; the attributes come from the state store.
"""

from __future__ import annotations

from typing import Iterator

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon
from pycrio.server.streaming_list import chunks
from pycrio.state.records import ContainerRecord


def _stats(container: ContainerRecord) -> api_pb2.ContainerStats:
    config = container.container_config
    return api_pb2.ContainerStats(
        attributes=api_pb2.ContainerAttributes(
            id=container.id, metadata=config.metadata, labels=config.labels, annotations=config.annotations
        )
    )


def _matching(daemon: Daemon, flt: api_pb2.ContainerStatsFilter) -> list[api_pb2.ContainerStats]:
    containers = daemon.state.list_containers(
        id_prefix=flt.id, pod_id_prefix=flt.pod_sandbox_id, labels=dict(flt.label_selector)
    )
    return [_stats(c) for c in containers]


def container_stats(daemon: Daemon, request: api_pb2.ContainerStatsRequest) -> api_pb2.ContainerStatsResponse:
    return api_pb2.ContainerStatsResponse(stats=_stats(daemon.state.get_container(request.container_id)))


def list_container_stats(
    daemon: Daemon, request: api_pb2.ListContainerStatsRequest
) -> api_pb2.ListContainerStatsResponse:
    return api_pb2.ListContainerStatsResponse(stats=_matching(daemon, request.filter))


def stream_container_stats(
    daemon: Daemon, request: api_pb2.StreamContainerStatsRequest
) -> Iterator[api_pb2.StreamContainerStatsResponse]:
    for chunk in chunks(_matching(daemon, request.filter)):
        yield api_pb2.StreamContainerStatsResponse(container_stats=chunk)
