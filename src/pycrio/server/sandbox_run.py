"""RunPodSandbox: namespaces, pod files, network; its span's children show where pod start went."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def run_pod_sandbox(daemon: Daemon, request: api_pb2.RunPodSandboxRequest) -> api_pb2.RunPodSandboxResponse:
    pod_id = daemon.sandboxes.run(request.config, request.runtime_handler)
    return api_pb2.RunPodSandboxResponse(pod_sandbox_id=pod_id)
