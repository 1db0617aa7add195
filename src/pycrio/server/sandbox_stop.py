"""StopPodSandbox: stop the pod's containers, release its network and namespaces (idempotent)."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.errors import InvalidArgument
from pycrio.server.daemon import Daemon


def stop_pod_sandbox(daemon: Daemon, request: api_pb2.StopPodSandboxRequest) -> api_pb2.StopPodSandboxResponse:
    if not request.pod_sandbox_id:
        raise InvalidArgument("pod sandbox ID must not be empty")
    daemon.sandboxes.stop(request.pod_sandbox_id)
    return api_pb2.StopPodSandboxResponse()
