"""Exec: a URL on the stream server for an interactive command in a running container (the
session itself, SPDY or WebSocket, is served there: see pycrio.pods.streams)."""

from __future__ import annotations

from pycrio.cri import api_pb2
from pycrio.server.daemon import Daemon


def exec_(daemon: Daemon, request: api_pb2.ExecRequest) -> api_pb2.ExecResponse:
    return api_pb2.ExecResponse(url=daemon.streams.exec_url(request))
