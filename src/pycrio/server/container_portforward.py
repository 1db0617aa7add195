"""PortForward: a URL on the stream server for connections to ports in a pod's network namespace."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def port_forward(daemon: Daemon, request: api_pb2.PortForwardRequest) -> api_pb2.PortForwardResponse:
    return api_pb2.PortForwardResponse(url=daemon.streams.port_forward_url(request))
