"""PodSandboxStatus."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def pod_sandbox_status(daemon: Daemon, request: api_pb2.PodSandboxStatusRequest) -> api_pb2.PodSandboxStatusResponse:
    pod = daemon.state.get_pod(request.pod_sandbox_id)
    return api_pb2.PodSandboxStatusResponse(
        status=api_pb2.PodSandboxStatus(
            id=pod.id,
            metadata=pod.metadata,
            state=pod.state,
            created_at=pod.created_at,
            labels=pod.labels,
            annotations=pod.annotations,
            runtime_handler=pod.runtime_handler,
        )
    )
