"""StopContainer: the image's stop signal (default SIGTERM), SIGKILL after `timeout` seconds.

Idempotent: a stopped container, or one that does not exist (any more), is not an error.
"""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.errors import InvalidArgument
from pycrio.server.daemon import Daemon


def stop_container(daemon: Daemon, request: api_pb2.StopContainerRequest) -> api_pb2.StopContainerResponse:
    if not request.container_id:
        raise InvalidArgument("container ID must not be empty")
    daemon.containers.stop(request.container_id, max(0, request.timeout))
    return api_pb2.StopContainerResponse()
