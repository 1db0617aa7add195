"""StartContainer."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def start_container(daemon: Daemon, request: api_pb2.StartContainerRequest) -> api_pb2.StartContainerResponse:
    daemon.containers.start(request.container_id)
    return api_pb2.StartContainerResponse()
