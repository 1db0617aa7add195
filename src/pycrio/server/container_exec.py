"""ExecSync: run a command in a container and return its output and exit code."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def exec_sync(daemon: Daemon, request: api_pb2.ExecSyncRequest) -> api_pb2.ExecSyncResponse:
    result = daemon.containers.exec_sync(request.container_id, list(request.cmd), request.timeout)
    return api_pb2.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code)
