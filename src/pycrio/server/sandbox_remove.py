"""RemovePodSandbox: stop, remove the pod's containers and everything it made (idempotent)."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.errors import InvalidArgument
from pycrio.server.daemon import Daemon


def remove_pod_sandbox(daemon: Daemon, request: api_pb2.RemovePodSandboxRequest) -> api_pb2.RemovePodSandboxResponse:
    if not request.pod_sandbox_id:
        raise InvalidArgument("pod sandbox ID must not be empty")
    daemon.sandboxes.remove(request.pod_sandbox_id)
    return api_pb2.RemovePodSandboxResponse()
