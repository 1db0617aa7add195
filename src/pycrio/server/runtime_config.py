"""RuntimeConfig and UpdateRuntimeConfig: the cgroup driver kubelet must match, the pod CIDR."""

from __future__ import annotations

import logging

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon

log = logging.getLogger("pycrio.server")


def runtime_config(daemon: Daemon, request: api_pb2.RuntimeConfigRequest) -> api_pb2.RuntimeConfigResponse:
    # pycrio drives cgroups through cgroupfs (runc's systemd driver does not work on every host).
    return api_pb2.RuntimeConfigResponse(
        linux=api_pb2.LinuxRuntimeConfiguration(cgroup_driver=api_pb2.CgroupDriver.CGROUPFS)
    )


def update_runtime_config(
    daemon: Daemon, request: api_pb2.UpdateRuntimeConfigRequest
) -> api_pb2.UpdateRuntimeConfigResponse:
    cidr = request.runtime_config.network_config.pod_cidr
    if cidr and cidr != daemon.state.pod_cidr:
        log.info("pod CIDR set to %s", cidr)
        daemon.state.pod_cidr = cidr
    return api_pb2.UpdateRuntimeConfigResponse()
