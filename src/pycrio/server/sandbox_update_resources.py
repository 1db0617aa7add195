"""UpdatePodSandboxResources: the pod-level resources kubelet's in-place resize settles on."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def update_pod_sandbox_resources(
    daemon: Daemon, request: api_pb2.UpdatePodSandboxResourcesRequest
) -> api_pb2.UpdatePodSandboxResourcesResponse:
    daemon.sandboxes.update_resources(
        request.pod_sandbox_id,
        request.resources if request.HasField("resources") else None,
        request.overhead if request.HasField("overhead") else None,
    )
    return api_pb2.UpdatePodSandboxResourcesResponse()
