"""PodSandboxStatus."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon
from pycrio.state.records import SandboxRecord


def pod_sandbox_status(daemon: Daemon, request: api_pb2.PodSandboxStatusRequest) -> api_pb2.PodSandboxStatusResponse:
    return api_pb2.PodSandboxStatusResponse(status=sandbox_status_of(daemon.state.get_pod(request.pod_sandbox_id)))


def sandbox_status_of(pod: SandboxRecord) -> api_pb2.PodSandboxStatus:
    config = pod.pod_config
    status = api_pb2.PodSandboxStatus(
        id=pod.id,
        metadata=config.metadata,
        state=pod.cri_state,
        created_at=pod.created_at,
        labels=config.labels,
        annotations=config.annotations,
        runtime_handler=pod.runtime_handler,
    )
    if pod.ips:
        status.network.ip = pod.ips[0]
        status.network.additional_ips.extend(api_pb2.PodIP(ip=ip) for ip in pod.ips[1:])
    status.linux.namespaces.options.CopyFrom(config.linux.security_context.namespace_options)
    return status
