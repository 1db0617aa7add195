"""CreateContainer: rootfs from the image, OCI spec from the CRI config, created by the runtime."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def create_container(daemon: Daemon, request: api_pb2.CreateContainerRequest) -> api_pb2.CreateContainerResponse:
    container_id = daemon.containers.create(request.pod_sandbox_id, request.config, request.sandbox_config)
    return api_pb2.CreateContainerResponse(container_id=container_id)
