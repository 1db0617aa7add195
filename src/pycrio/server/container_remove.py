"""RemoveContainer: a running container is killed first; removing a missing one is fine."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.errors import InvalidArgument
from pycrio.server.daemon import Daemon


def remove_container(daemon: Daemon, request: api_pb2.RemoveContainerRequest) -> api_pb2.RemoveContainerResponse:
    if not request.container_id:
        raise InvalidArgument("container ID must not be empty")
    daemon.containers.remove(request.container_id)
    return api_pb2.RemoveContainerResponse()
