"""StopContainer: the image's stop signal (default SIGTERM), SIGKILL after `timeout` seconds."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def stop_container(daemon: Daemon, request: api_pb2.StopContainerRequest) -> api_pb2.StopContainerResponse:
    daemon.containers.stop(request.container_id, max(0, request.timeout))
    return api_pb2.StopContainerResponse()
