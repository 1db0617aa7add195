"""ReopenContainerLog: the monitor reopens the log file after kubelet rotated it."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def reopen_container_log(daemon: Daemon, request: api_pb2.ReopenContainerLogRequest) -> api_pb2.ReopenContainerLogResponse:
    daemon.containers.reopen_log(request.container_id)
    return api_pb2.ReopenContainerLogResponse()
