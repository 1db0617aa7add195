"""ContainerStatus."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def container_status(daemon: Daemon, request: api_pb2.ContainerStatusRequest) -> api_pb2.ContainerStatusResponse:
    c = daemon.state.get_container(request.container_id)
    return api_pb2.ContainerStatusResponse(
        status=api_pb2.ContainerStatus(
            id=c.id,
            metadata=c.metadata,
            state=c.state,
            created_at=c.created_at,
            image=c.image,
            image_ref=c.image_ref,
            image_id=c.image_id,
            labels=c.labels,
            annotations=c.annotations,
        )
    )
