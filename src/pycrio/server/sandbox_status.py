"""PodSandboxStatus. With `verbose`, or for kubelet's evented PLEG (`enable_pod_events`), also the
statuses of the pod's containers and the time they were taken, as CRI-O does; `verbose` adds the
pod's namespaces, cgroup, infra process and the pod-level resources in effect."""

from __future__ import annotations

import json
import time

from google.protobuf import json_format

from pycrio.cri import api_pb2
from pycrio.server.container_status import container_status_of
from pycrio.server.daemon import Daemon
from pycrio.state.records import SandboxRecord
from pycrio.state.store import StateStore


def pod_sandbox_status(daemon: Daemon, request: api_pb2.PodSandboxStatusRequest) -> api_pb2.PodSandboxStatusResponse:
    pod = daemon.state.get_pod(request.pod_sandbox_id)
    response = api_pb2.PodSandboxStatusResponse(status=sandbox_status_of(pod))
    if request.verbose or daemon.config.runtime.enable_pod_events:
        # Taken first: every status below is at least as recent as the timestamp says, which is
        # what kubelet compares with its cache.
        response.timestamp = time.time_ns()
        response.containers_statuses.extend(
            container_status_of(daemon.containers.refresh(c)) for c in daemon.state.containers_of(pod.id)
        )
    if request.verbose:
        info = {
            "sandboxDirectory": pod.directory,
            "cgroupParent": pod.cgroup_parent,
            "namespaces": pod.namespaces,
            "runtimeHandler": pod.runtime_handler,
            "pid": pod.infra_pid,
        }
        for key, value in (("resources", pod.pod_resources), ("overhead", pod.pod_overhead)):
            if value is not None:  # the pod-level resources in effect (RunPodSandbox's, then resizes')
                info[key] = json_format.MessageToDict(value)
        response.info["info"] = json.dumps(info, sort_keys=True)
    return response


def sandbox_status_of(pod: SandboxRecord) -> api_pb2.PodSandboxStatus:
    config = pod.pod_config
    # A READY pod whose infra process died or whose pinned namespaces went away cannot run
    # containers any more: say so at once (kubelet then recreates it) rather than at the next restart.
    state = api_pb2.SANDBOX_NOTREADY if StateStore.pod_problem(pod) else pod.cri_state
    status = api_pb2.PodSandboxStatus(
        id=pod.id,
        metadata=config.metadata,
        state=state,
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
