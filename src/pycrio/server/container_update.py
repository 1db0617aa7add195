"""UpdateContainerResources: new cgroup limits for a created or running container."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def update_container_resources(
    daemon: Daemon, request: api_pb2.UpdateContainerResourcesRequest
) -> api_pb2.UpdateContainerResourcesResponse:
    daemon.containers.update_resources(request.container_id, request.linux)
    return api_pb2.UpdateContainerResourcesResponse()
